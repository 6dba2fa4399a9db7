//! Collecting each row's samples and printing the markdown table: median and min–max per system,
//! and the ratio Celerity ÷ Celery of the medians.

/// One table row: a metric of a shape on a setup, with each system's samples (one per run).
#[derive(Debug, Clone)]
pub struct Row {
    pub shape: String,
    pub setup: String,
    pub metric: String,
    pub celery: Vec<f64>,
    pub celerity: Vec<f64>,
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

/// The markdown table of all rows.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| shape | broker / results | metric | Celery 5.7 | Celerity | Celerity ÷ Celery |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = match (summary(&r.celery), summary(&r.celerity)) {
            (Some((a, _, _)), Some((b, _, _))) if a > 0.0 && r.comparable => {
                format!("{:.2}×", b / a)
            }
            _ => "—".into(),
        };
        let metric = if r.note.is_empty() {
            r.metric.clone()
        } else {
            format!("{} ({})", r.metric, r.note)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.shape,
            r.setup,
            metric,
            cell(&r.celery),
            cell(&r.celerity),
            ratio
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
