//! Where a Gen-neG stack's held-out NLL rises, and why (the `genneg_nll` example): per-point
//! NLL against the baseline's, the points above a threshold with their distances to the
//! nearest square edge and the board's border, what each classifier says there, and how
//! the mean's change splits between points near an edge and the rest.

use candle_core::{DType, Device, Result, Tensor};
use scoreguide_genneg::Stack;
use scoreguide_guidance::LogProb;
use serde::Serialize;

#[derive(Serialize)]
pub struct Outlier {
    pub x: [f64; 2],
    pub nll: f64,
    pub baseline_nll: f64,
    pub edge_distance: f64,
    pub border_distance: f64,
    /// log C_k(x; σ_min) for each stacked classifier.
    pub log_c: Vec<f64>,
}

#[derive(Serialize)]
pub struct ModelReport {
    pub path: String,
    pub classifiers: usize,
    pub nll_mean: f64,
    pub nll_median: f64,
    pub nll_mean_without_outliers: f64,
    pub outliers: Vec<Outlier>,
}

/// Distance to the nearest square edge (a multiple of 2 in x or y inside the board) and
/// to the board's border at ±4.
pub fn distances(p: [f64; 2]) -> (f64, f64) {
    let edge = p
        .iter()
        .map(|v| {
            let r = v.rem_euclid(2.0);
            r.min(2.0 - r)
        })
        .fold(f64::INFINITY, f64::min);
    let border = p
        .iter()
        .map(|v| 4.0 - v.abs())
        .fold(f64::INFINITY, f64::min);
    (edge, border)
}

pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// The stack with every classifier guiding at σ ≤ `sigma_max` only.
pub fn gated(stack: &Stack, sigma_max: f64) -> Stack {
    let mut s = stack.clone();
    for c in &mut s.classifiers {
        c.gate = Some(sigma_max);
    }
    s
}

/// log C_k(x; σ) of each of the stack's classifiers at the rows of `x` (f64).
pub fn log_c(stack: &Stack, x: &Tensor, sigma: &Tensor, dev: &Device) -> Result<Vec<Vec<f64>>> {
    stack
        .classifiers
        .iter()
        .map(|c| {
            c.build(DType::F64, dev)?
                .log_prob(x, sigma)?
                .to_vec1::<f64>()
        })
        .collect()
}

/// The points of `pts` whose NLL is above `threshold`, with where they are and what the
/// classifiers say there.
pub fn outliers(
    pts: &[[f64; 2]],
    nll: &[f64],
    base_nll: &[f64],
    log_c: &[Vec<f64>],
    threshold: f64,
) -> Vec<Outlier> {
    (0..pts.len())
        .filter(|&i| nll[i] > threshold)
        .map(|i| {
            let (edge_distance, border_distance) = distances(pts[i]);
            Outlier {
                x: pts[i],
                nll: nll[i],
                baseline_nll: base_nll[i],
                edge_distance,
                border_distance,
                log_c: log_c.iter().map(|c| c[i]).collect(),
            }
        })
        .collect()
}

/// Prints the outliers, the NLL change's correlation with Σ_k log C_k at σ_min, the
/// `top` largest increases, and the change's split between points near a square edge
/// and the rest.
pub fn print_diagnosis(
    pts: &[[f64; 2]],
    nll: &[f64],
    base_nll: &[f64],
    log_c: &[Vec<f64>],
    outliers: &[Outlier],
    top: usize,
) {
    let n = pts.len();
    if !outliers.is_empty() {
        println!("| x | y | NLL | baseline NLL | to edge | to border | log C_k(x; σ_min) |");
        println!("|---|---|---|---|---|---|---|");
        for o in outliers {
            let lc: Vec<String> = o.log_c.iter().map(|v| format!("{v:.2}")).collect();
            println!(
                "| {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {} |",
                o.x[0],
                o.x[1],
                o.nll,
                o.baseline_nll,
                o.edge_distance,
                o.border_distance,
                lc.join(", ")
            );
        }
    }
    // Where the change in NLL comes from: Σ_k log C_k at σ_min against the NLL change.
    let dn: Vec<f64> = nll.iter().zip(base_nll).map(|(a, b)| a - b).collect();
    let sum_lc: Vec<f64> = (0..n)
        .map(|i| log_c.iter().map(|c| c[i]).sum::<f64>())
        .collect();
    let corr = {
        let (ma, mb) = (mean(&dn), mean(&sum_lc));
        let cov: f64 = dn
            .iter()
            .zip(&sum_lc)
            .map(|(a, b)| (a - ma) * (b - mb))
            .sum();
        let va: f64 = dn.iter().map(|a| (a - ma).powi(2)).sum();
        let vb: f64 = sum_lc.iter().map(|b| (b - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    };
    println!(
        "NLL change vs baseline: mean {:+.4}; correlation with Σ_k log C_k(x; σ_min): {corr:.3}",
        mean(&dn)
    );
    // Which points carry the mean's change: the largest increases, and how the
    // change splits between points near a square edge and the rest.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| dn[b].total_cmp(&dn[a]));
    println!("largest NLL increases:");
    println!("| x | y | NLL | baseline NLL | to edge | to border | Σ log C_k |");
    println!("|---|---|---|---|---|---|---|");
    for &i in order.iter().take(top) {
        let (e, b) = distances(pts[i]);
        println!(
            "| {:.3} | {:.3} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} |",
            pts[i][0], pts[i][1], nll[i], base_nll[i], e, b, sum_lc[i]
        );
    }
    for cut in [0.05, 0.1, 0.2] {
        let (near, far): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| distances(pts[i]).0 < cut);
        let part = |ix: &[usize]| ix.iter().map(|&i| dn[i]).sum::<f64>() / n as f64;
        println!(
                "points within {cut} of a square edge: {} of {}, contributing {:+.4} of the mean change (the rest {:+.4})",
                near.len(),
                n,
                part(&near),
                part(&far)
            );
    }
}
