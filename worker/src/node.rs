//! Node names: `--hostname NAME@%h` expanded the way Celery expands it.
//!
//! `%h` is the full host name, `%n` its first label, `%d` the rest (the domain), `%i` the pool
//! process index (0 for an unsupervised worker) and `%%` a literal `%`. A name without `@` gets
//! `@<host>` appended, as Celery does.
//!
//! Pool children: with `-P N` and N > 1 every child process is a worker of its own — its own broker
//! connection, pidbox queue, counters and pid — so each is its own node. Unless the template says
//! where the index goes (`%i`), it is appended to the name part: `celerity@host` becomes
//! `celerity-0@host` … `celerity-<N-1>@host`. A restarted child keeps its slot's name, so Flower and
//! `inspect` see the same node come back. With N = 1 (or unsupervised) the name is used as given.

/// The node name for `template` in pool slot `slot` (None: not a pool child) of a pool of
/// `processes`, on host `host`.
pub fn nodename(template: &str, slot: Option<usize>, processes: usize, host: &str) -> String {
    let index = slot.unwrap_or(0);
    let (short, domain) = host.split_once('.').unwrap_or((host, ""));
    let mut out = String::with_capacity(template.len() + host.len());
    let mut chars = template.chars();
    let mut has_index = false;
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('h') => out.push_str(host),
            Some('n') => out.push_str(short),
            Some('d') => out.push_str(domain),
            Some('i') => {
                has_index = true;
                out.push_str(&index.to_string());
            }
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    if !out.contains('@') {
        out.push('@');
        out.push_str(host);
    }
    if slot.is_some() && processes > 1 && !has_index {
        if let Some(at) = out.find('@') {
            out.insert_str(at, &format!("-{index}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::nodename;

    #[test]
    fn expands_like_celery() {
        assert_eq!(
            nodename("celerity@%h", None, 1, "box.example.com"),
            "celerity@box.example.com"
        );
        assert_eq!(nodename("w1@%n", None, 1, "box.example.com"), "w1@box");
        assert_eq!(
            nodename("w@%n.%d", None, 1, "box.example.com"),
            "w@box.example.com"
        );
        assert_eq!(nodename("plain", None, 1, "box"), "plain@box");
        assert_eq!(nodename("a%%b@%h", None, 1, "box"), "a%b@box");
    }

    #[test]
    fn pool_children_are_distinct_nodes() {
        assert_eq!(nodename("celerity@%h", Some(0), 3, "box"), "celerity-0@box");
        assert_eq!(nodename("celerity@%h", Some(2), 3, "box"), "celerity-2@box");
        assert_eq!(nodename("w%i@%h", Some(2), 3, "box"), "w2@box");
        // A pool of one keeps the name as given.
        assert_eq!(nodename("celerity@%h", Some(0), 1, "box"), "celerity@box");
    }
}
