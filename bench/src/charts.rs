//! The pictures of a run, as SVG (plotters' SVG backend, no fonts or bitmaps): jobs/s per system
//! and broker beside the broker alone (grouped bars), the round-trip latency distribution of each
//! system (CDF), and how a measure grows with one parameter (curves).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{BenchError, Result};

/// One bar: its group on the x axis, its series (colour), and its height.
#[derive(Debug, Clone)]
pub struct Bar {
    pub group: String,
    pub series: String,
    pub value: f64,
}

/// A named line: (x, y) points.
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const SIZE: (u32, u32) = (900, 500);

/// A fixed colour per series name, so the same system has the same colour in every picture.
fn colour(name: &str, i: usize) -> RGBColor {
    let n = name.to_ascii_lowercase();
    if n.starts_with("celery ") || n == "celery" {
        RGBColor(0x8c, 0x8c, 0x8c)
    } else if n.starts_with("bullmq") {
        RGBColor(0xd9, 0x5f, 0x02)
    } else if n.contains("default") {
        RGBColor(0x74, 0xa9, 0xcf)
    } else if n.starts_with("celerity") {
        RGBColor(0x04, 0x5a, 0x8d)
    } else if n.contains("broker") || n.contains("floor") || n.contains("raw") {
        RGBColor(0x1b, 0x9e, 0x77)
    } else {
        let (r, g, b) = Palette99::pick(i).to_rgba().rgb();
        RGBColor(r, g, b)
    }
}

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("drawing: {e}"))
}

/// Grouped bars, value printed above each bar.
pub fn bars(path: &Path, title: &str, y_desc: &str, bars: &[Bar]) -> Result<()> {
    let mut groups: Vec<&str> = Vec::new();
    let mut series: Vec<&str> = Vec::new();
    for b in bars {
        if !groups.contains(&b.group.as_str()) {
            groups.push(&b.group);
        }
        if !series.contains(&b.series.as_str()) {
            series.push(&b.series);
        }
    }
    if groups.is_empty() {
        return Ok(());
    }
    let top = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1.0) * 1.15;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let g = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..g - 0.5, 0.0..top)
        .map_err(err)?;
    let names = groups.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names
                    .get(i as usize)
                    .map_or(String::new(), |s| s.to_string())
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| crate::report::fmt_num(*v))
        .draw()
        .map_err(err)?;
    let width = 0.8 / series.len() as f64;
    for (si, s) in series.iter().enumerate() {
        let c = colour(s, si);
        let mine: Vec<(f64, f64)> = bars
            .iter()
            .filter(|b| b.series == *s)
            .filter_map(|b| {
                let gi = groups.iter().position(|g| *g == b.group)?;
                Some((gi as f64 - 0.4 + width * si as f64, b.value))
            })
            .collect();
        chart
            .draw_series(
                mine.iter()
                    .map(|&(x, v)| Rectangle::new([(x, 0.0), (x + width * 0.92, v)], c.filled())),
            )
            .map_err(err)?
            .label(*s)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        chart
            .draw_series(mine.iter().map(|&(x, v)| {
                Text::new(
                    crate::report::fmt_num(v),
                    (x, v + top * 0.01),
                    ("sans-serif", 11).into_font(),
                )
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Empirical CDFs of each series' samples (milliseconds) on a log x axis.
pub fn cdf(path: &Path, title: &str, series: &[(String, Vec<f64>)]) -> Result<()> {
    let lines: Vec<Line> = series
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(name, v)| {
            let mut s = v.clone();
            s.sort_by(f64::total_cmp);
            let n = s.len() as f64;
            Line {
                name: name.clone(),
                points: s
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x.max(1e-3), (i + 1) as f64 / n))
                    .collect(),
            }
        })
        .collect();
    curves(
        path,
        title,
        "round trip, ms (log)",
        "fraction of calls",
        &lines,
        true,
    )
}

/// Lines through points; the x axis logarithmic if `log_x`, the y axis from 0.
pub fn curves(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    log_x: bool,
) -> Result<()> {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    if lo > hi {
        return Ok(());
    }
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log_x {
        let mut chart = builder
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| crate::report::fmt_num(*v))
            .y_label_formatter(&|v| crate::report::fmt_num(*v))
            .draw()
            .map_err(err)?;
        for (i, l) in lines.iter().enumerate() {
            let c = colour(&l.name, i);
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(l.name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
        }
        legend(&mut chart)?;
    } else {
        let mut chart = builder
            .build_cartesian_2d(lo.min(0.0)..hi * 1.05, 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| crate::report::fmt_num(*v))
            .y_label_formatter(&|v| crate::report::fmt_num(*v))
            .draw()
            .map_err(err)?;
        for (i, l) in lines.iter().enumerate() {
            let c = colour(&l.name, i);
            chart
                .draw_series(LineSeries::new(l.points.iter().copied(), c.stroke_width(2)))
                .map_err(err)?
                .label(l.name.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2)));
            chart
                .draw_series(l.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(err)?;
        }
        legend(&mut chart)?;
    }
    root.present().map_err(err)
}

fn legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pictures_are_written_as_svg() {
        let dir = std::env::temp_dir().join(format!("bench-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = |g: &str, s: &str, v| Bar {
            group: g.into(),
            series: s.into(),
            value: v,
        };
        let bar_path = dir.join("bars.svg");
        bars(
            &bar_path,
            "t",
            "jobs/s",
            &[
                b("Redis", "Celery", 500.0),
                b("Redis", "Celerity", 20_000.0),
            ],
        )
        .unwrap();
        let cdf_path = dir.join("cdf.svg");
        cdf(
            &cdf_path,
            "t",
            &[("Celerity Redis".into(), vec![0.4, 0.3, 0.9])],
        )
        .unwrap();
        for p in [&bar_path, &cdf_path] {
            let svg = std::fs::read_to_string(p).unwrap();
            assert!(svg.starts_with("<svg"), "{svg}");
            assert!(svg.contains("Celerity"), "no legend in {}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
