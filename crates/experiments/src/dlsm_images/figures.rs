//! The pictures of the run: the method grid and the paper's Fig. 4.

use crate::image_metrics::Images;
use crate::images::save_image_grid;
use candle_core::{bail, Result, Tensor};

/// The PNG grid of DLSM's figures: a row per class, `per_method` samples of each method
/// side by side (methods in the order given).
pub fn method_grid(
    path: &std::path::Path,
    samples: &[&Images],
    classes: usize,
    per_class: usize,
    per_method: usize,
) -> Result<()> {
    let Some(first) = samples.first() else {
        bail!("sample grid: no methods");
    };
    let shown = per_method.min(per_class);
    let mut rows = Vec::new();
    for class in 0..classes {
        for s in samples {
            rows.push(s.rows.narrow(0, class * per_class, shown)?);
        }
    }
    save_image_grid(
        path,
        &Tensor::cat(&rows, 0)?,
        first.channels,
        first.size,
        shown * samples.len(),
    )
}

/// DLSM's Fig. 4: the class-wise precision, recall, density and coverage of each method
/// as grouped bars, one panel per metric.
pub fn classwise_figure(path: &std::path::Path, methods: &[(&str, Vec<[f64; 4]>)]) -> Result<()> {
    use crate::plot::{bar_panel, save_grid, BLUE, GREEN, ORANGE, RED};
    let colours = [BLUE, ORANGE, GREEN, RED];
    let panels: Vec<_> = ["precision", "recall", "density", "coverage"]
        .iter()
        .enumerate()
        .map(|(k, metric)| {
            let series: Vec<_> = methods
                .iter()
                .enumerate()
                .map(|(i, (name, per_class))| {
                    (
                        *name,
                        colours[i % colours.len()],
                        per_class.iter().map(|v| v[k]).collect(),
                    )
                })
                .collect();
            bar_panel(&format!("class-wise {metric} per class"), &series)
        })
        .collect();
    save_grid(path, &panels, 2)
}
