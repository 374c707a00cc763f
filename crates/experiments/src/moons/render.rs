//! The paper's Fig. 1 for two moons: posterior-score fields and samples per method.

use super::eval::Evaluation;
use crate::plot::{save_grid, Canvas, Rgb, BLACK, BLUE, ORANGE};
use candle_core::Result;
use std::path::Path;

const DARK_GREY: Rgb = [90, 90, 90];

const X_RANGE: (f64, f64) = (-40.0, 40.0);
const Y_RANGE: (f64, f64) = (-25.0, 25.0);

/// Posterior-score arrows on every other grid point, lengths compressed so both weak and
/// strong fields read.
fn field_panel(title: &str, grid: &[[f64; 2]], score: &[f64], color: Rgb) -> Canvas {
    let mut c = Canvas::new(520, 380, X_RANGE, Y_RANGE);
    let max = score
        .chunks_exact(2)
        .map(|s| s[0].hypot(s[1]))
        .fold(1e-12, f64::max);
    for (i, (p, s)) in grid.iter().zip(score.chunks_exact(2)).enumerate() {
        if (i / 35) % 2 == 1 || (i % 35) % 2 == 1 {
            continue;
        }
        let norm = s[0].hypot(s[1]);
        if norm == 0.0 {
            continue;
        }
        let len = 4.4 * (norm / max).sqrt();
        let tip = (p[0] + s[0] / norm * len, p[1] + s[1] / norm * len);
        c.arrow((p[0], p[1]), tip, color);
    }
    c.axes(title, &[-40.0, -20.0, 0.0, 20.0, 40.0], &[-20.0, 0.0, 20.0]);
    c
}

fn samples_panel(title: &str, per_class: &[Vec<f64>]) -> Canvas {
    let mut c = Canvas::new(520, 380, X_RANGE, Y_RANGE);
    for (pts, color) in per_class.iter().zip([BLUE, ORANGE]) {
        let n = pts.len() / 2;
        let alpha = (1500.0 / n as f32).clamp(0.05, 0.8);
        for p in pts.chunks_exact(2).take(5_000) {
            c.dot(p[0], p[1], 1.2, color, alpha);
        }
    }
    c.axes(title, &[-40.0, -20.0, 0.0, 20.0, 40.0], &[-20.0, 0.0, 20.0]);
    c
}

/// The paper's Fig. 1: posterior-score fields for each class (rows 1–2) and samples
/// (row 3), one column per method and the Parzen oracle (with the data as its samples).
pub fn figure(path: &Path, e: &Evaluation) -> Result<()> {
    let (grid, panels, true_post) = (&e.grid, &e.fields, &e.true_post);
    let (samples, data) = (&e.samples, &e.class_points);
    let names: Vec<String> = samples.iter().map(|(n, _)| n.clone()).collect();
    let mut all = Vec::new();
    for (ci, oracle) in true_post.iter().enumerate() {
        for name in &names {
            let (_, _, s) = panels
                .iter()
                .find(|(c, n, _)| *c == ci && n == name)
                .expect("one panel per method and class");
            all.push(field_panel(
                &format!("{name}: class {}", ci + 1),
                grid,
                s,
                BLACK,
            ));
        }
        all.push(field_panel(
            &format!("oracle: class {}", ci + 1),
            grid,
            oracle,
            DARK_GREY,
        ));
    }
    for (name, s) in samples {
        all.push(samples_panel(&format!("{name}: samples"), s));
    }
    all.push(samples_panel("data", data));
    save_grid(path, &all, names.len() + 1)
}
