//! A PostgreSQL schema (and roles) of the test's own on the local server, dropped on `Drop` even
//! when the test panics. Uses `psql`, so `Drop` needs no runtime.

use std::process::Command;

/// The local PostgreSQL (trust auth), database `postgres`, as our backend URL spells it.
pub const POSTGRES: &str = "db+postgresql://postgres@127.0.0.1:5432/postgres";
/// The same for SQLAlchemy (Celery's `db+` prefix included).
pub const PY_POSTGRES: &str = "db+postgresql://postgres@127.0.0.1:5432/postgres";

/// A schema named `celerity_<tag>_<uuid>`; roles made with [`PgSchema::role`] go with it.
pub struct PgSchema {
    pub name: String,
    roles: Vec<String>,
}

impl PgSchema {
    /// Creates the schema (panics if the server is not there: the test cannot run).
    pub fn new(tag: &str) -> PgSchema {
        // `pg_` is reserved for system schemas: every name starts `celerity_`.
        let name = format!("celerity_{tag}_{}", uuid::Uuid::new_v4().simple());
        let s = PgSchema {
            name,
            roles: Vec::new(),
        };
        s.psql(&format!("CREATE SCHEMA \"{}\"", s.name));
        s
    }

    /// Our backend URL for this schema, plus `extra` options (`&a=b…`).
    pub fn url(&self, extra: &str) -> String {
        format!("{POSTGRES}?schema={}{extra}", self.name)
    }

    /// Runs SQL as `postgres`; the unaligned, tuples-only output. Panics if psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = run_psql(sql);
        match out {
            Ok(s) => s,
            Err(e) => panic!("psql {sql:?}: {e}"),
        }
    }

    /// Creates a login role `<schema>_<suffix>` that is dropped with the schema; returns its name.
    pub fn role(&mut self, suffix: &str) -> String {
        let role = format!("{}_{suffix}", self.name);
        self.psql(&format!("CREATE ROLE \"{role}\" LOGIN"));
        self.roles.push(role.clone());
        role
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = run_psql(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name));
        for role in &self.roles {
            let _ = run_psql(&format!(
                "DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\""
            ));
        }
    }
}

fn run_psql(sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}
