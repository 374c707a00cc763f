//! Precision, recall, density and coverage (Kynkäänniemi et al. 2019; Naeem et al. 2020),
//! with the `prdc` package's definitions: a point's radius is the distance to its k-th
//! nearest neighbour in its own set (itself excluded), and every comparison is strict.

use crate::rows::{check_rows, for_gram_blocks, sq_norms};
use candle_core::{bail, Result};
use serde::Serialize;

/// The four manifold metrics of fake samples against real ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prdc {
    /// Fraction of fake points inside some real point's k-NN ball.
    pub precision: f64,
    /// Fraction of real points inside some fake point's k-NN ball.
    pub recall: f64,
    /// Mean number of real balls holding each fake point, divided by k.
    pub density: f64,
    /// Fraction of real balls that hold at least one fake point.
    pub coverage: f64,
}

/// Squared distance from each row to its k-th nearest other row of the same set.
fn knn_radii_sq(x: &[f64], d: usize, k: usize) -> Result<Vec<f64>> {
    let n = x.len() / d;
    let norms = sq_norms(x, d);
    let mut radii = Vec::with_capacity(n);
    let mut buf = Vec::with_capacity(n);
    for_gram_blocks(x, x, d, |i0, g| {
        for (r, gi) in g.chunks_exact(n).enumerate() {
            let i = i0 + r;
            buf.clear();
            // ‖a − b‖² = ‖a‖² + ‖b‖² − 2 a·b; the row itself is set to exactly 0.
            buf.extend((0..n).map(|j| match j == i {
                true => 0.0,
                false => (norms[i] + norms[j] - 2.0 * gi[j]).max(0.0),
            }));
            // Index k of the sorted distances, self (0) included at index 0: the k-th
            // neighbour excluding self, exactly as prdc's k + 1 smallest.
            let (_, kth, _) = buf.select_nth_unstable_by(k, f64::total_cmp);
            radii.push(*kth);
        }
        Ok(())
    })?;
    Ok(radii)
}

/// Precision, recall, density and coverage of `fake: [m, d]` against `real: [n, d]`
/// (row-major) with `k` nearest neighbours. Needs more than `k` rows in each set.
pub fn prdc(real: &[f64], fake: &[f64], d: usize, k: usize) -> Result<Prdc> {
    let (n, m) = (
        check_rows(real, d, "real features")?,
        check_rows(fake, d, "fake features")?,
    );
    if k == 0 {
        bail!("PRDC: k must be at least 1");
    }
    if n <= k || m <= k {
        bail!(
            "PRDC: k = {k} needs at least {} rows in each set, got {n} real and {m} fake",
            k + 1
        );
    }
    let real_r = knn_radii_sq(real, d, k)?;
    let fake_r = knn_radii_sq(fake, d, k)?;
    let (real_norms, fake_norms) = (sq_norms(real, d), sq_norms(fake, d));
    let mut precise = 0usize;
    let mut density_hits = 0usize;
    let mut recalled = vec![false; n];
    let mut covered = vec![false; n];
    let mut nearest_fake = vec![f64::INFINITY; n];
    for_gram_blocks(fake, real, d, |j0, g| {
        for (r, gj) in g.chunks_exact(n).enumerate() {
            let j = j0 + r;
            let mut in_some = false;
            for i in 0..n {
                let dist = (real_norms[i] + fake_norms[j] - 2.0 * gj[i]).max(0.0);
                if dist < real_r[i] {
                    in_some = true;
                    density_hits += 1;
                }
                if dist < fake_r[j] {
                    recalled[i] = true;
                }
                if dist < nearest_fake[i] {
                    nearest_fake[i] = dist;
                }
            }
            precise += usize::from(in_some);
        }
        Ok(())
    })?;
    for i in 0..n {
        covered[i] = nearest_fake[i] < real_r[i];
    }
    let frac = |v: &[bool]| v.iter().filter(|b| **b).count() as f64 / v.len() as f64;
    Ok(Prdc {
        precision: precise as f64 / m as f64,
        recall: frac(&recalled),
        density: density_hits as f64 / (k as f64 * m as f64),
        coverage: frac(&covered),
    })
}

/// Class-wise PRDC: [`prdc`] within each class (real and fake rows carry labels), then
/// averaged over the classes. Returns the average and the per-class values.
pub fn prdc_classwise(
    real: &[f64],
    real_labels: &[u32],
    fake: &[f64],
    fake_labels: &[u32],
    d: usize,
    k: usize,
) -> Result<(Prdc, Vec<Prdc>)> {
    let (n, m) = (
        check_rows(real, d, "real features")?,
        check_rows(fake, d, "fake features")?,
    );
    if real_labels.len() != n || fake_labels.len() != m {
        bail!(
            "class-wise PRDC: {} real labels for {n} rows, {} fake labels for {m} rows",
            real_labels.len(),
            fake_labels.len()
        );
    }
    let classes: std::collections::BTreeSet<u32> = real_labels.iter().copied().collect();
    let pick = |x: &[f64], labels: &[u32], c: u32| -> Vec<f64> {
        labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l == c)
            .flat_map(|(i, _)| x[i * d..(i + 1) * d].iter().copied())
            .collect()
    };
    let per_class = classes
        .iter()
        .map(|&c| {
            prdc(
                &pick(real, real_labels, c),
                &pick(fake, fake_labels, c),
                d,
                k,
            )
            .map_err(|e| candle_core::Error::msg(format!("class {c}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mean = |f: fn(&Prdc) -> f64| per_class.iter().map(f).sum::<f64>() / per_class.len() as f64;
    Ok((
        Prdc {
            precision: mean(|p| p.precision),
            recall: mean(|p| p.recall),
            density: mean(|p| p.density),
            coverage: mean(|p| p.coverage),
        },
        per_class,
    ))
}
