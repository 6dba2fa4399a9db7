//! Collecting each row's samples and printing the markdown table: median and min–max per system,
//! the ratios Celerity ÷ Celery and Celerity ÷ BullMQ of the medians, and Celerity's fraction of the
//! broker's own ceiling (or floor, for latency) measured in the same run.

/// One table row: a metric of a shape on a setup, with each system's samples (one per run).
#[derive(Debug, Clone)]
pub struct Row {
    pub shape: String,
    pub setup: String,
    pub metric: String,
    pub celery: Vec<f64>,
    pub celerity: Vec<f64>,
    /// BullMQ's samples, on the rows it runs (Redis).
    pub bullmq: Vec<f64>,
    /// What the broker alone does for this row in the same run (a rate, or a latency floor), and
    /// what that figure is.
    pub ceiling: Option<(f64, String)>,
    /// Said after the metric, e.g. a different job count for Celery.
    pub note: String,
    /// False when the two systems ran different amounts of work (no ratio then).
    pub comparable: bool,
}

impl Row {
    pub fn new(shape: &str, setup: &str, metric: &str) -> Row {
        Row {
            shape: shape.into(),
            setup: setup.into(),
            metric: metric.into(),
            celery: Vec::new(),
            celerity: Vec::new(),
            bullmq: Vec::new(),
            ceiling: None,
            note: String::new(),
            comparable: true,
        }
    }
}

/// (median, min, max) of samples; `None` when there are none.
pub fn summary(samples: &[f64]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    };
    Some((median, s[0], s[s.len() - 1]))
}

/// A number with a sensible number of digits and thousands separators.
pub fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        let n = v.round() as i64;
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            format!("-{out}")
        } else {
            out
        }
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(samples: &[f64]) -> String {
    match summary(samples) {
        None => "—".into(),
        Some((m, lo, hi)) if samples.len() == 1 => {
            let _ = (lo, hi);
            fmt_num(m)
        }
        Some((m, lo, hi)) => format!("{} ({}–{})", fmt_num(m), fmt_num(lo), fmt_num(hi)),
    }
}

/// Celerity's median ÷ `other`'s, as `1.23×`, or `—`.
fn ratio(celerity: &[f64], other: &[f64], comparable: bool) -> String {
    match (summary(other), summary(celerity)) {
        (Some((a, _, _)), Some((b, _, _))) if a > 0.0 && comparable => format!("{:.2}×", b / a),
        _ => "—".into(),
    }
}

/// The markdown table of all rows. The first six columns are the Celery/Celerity table as it was;
/// BullMQ and the broker's ceiling come after them.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| shape | broker / results | metric | Celery 5.7 | Celerity | Celerity ÷ Celery | BullMQ | \
         Celerity ÷ BullMQ | broker alone | Celerity ÷ broker alone |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let vs_celery = ratio(&r.celerity, &r.celery, r.comparable);
        let vs_bullmq = ratio(&r.celerity, &r.bullmq, r.comparable);
        let (ceiling, vs_ceiling) = match (&r.ceiling, summary(&r.celerity)) {
            (Some((c, what)), Some((b, _, _))) if *c > 0.0 => {
                (format!("{} ({what})", fmt_num(*c)), format!("{:.2}", b / c))
            }
            (Some((c, what)), _) => (format!("{} ({what})", fmt_num(*c)), "—".into()),
            _ => ("—".into(), "—".into()),
        };
        let metric = if r.note.is_empty() {
            r.metric.clone()
        } else {
            format!("{} ({})", r.metric, r.note)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {vs_celery} | {} | {vs_bullmq} | {ceiling} | {vs_ceiling} |\n",
            r.shape,
            r.setup,
            metric,
            cell(&r.celery),
            cell(&r.celerity),
            cell(&r.bullmq),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(fmt_num(1234567.4), "1,234,567");
        assert_eq!(fmt_num(460.2), "460");
        assert_eq!(fmt_num(6.54321), "6.54");
    }
}
