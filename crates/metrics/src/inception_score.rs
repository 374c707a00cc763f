//! Inception Score (Salimans et al. 2016) of class probabilities.

use crate::rows::check_rows;
use candle_core::{bail, Result};

/// IS = exp(E_x KL(p(y | x) ‖ p(y))) of `probs: [n, classes]` (rows of class
/// probabilities), computed on `splits` consecutive equal parts as the reference
/// implementations do: returns the mean and the standard deviation (population, as
/// `np.std`) over the parts. Between 1 (every row the same) and `classes` (confident
/// rows spread evenly over the classes).
///
/// ```
/// // Four confident rows, two per class: IS = 2 (the number of classes used).
/// let p = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0];
/// let (is, std) = scoreguide_metrics::inception_score(&p, 2, 1).unwrap();
/// assert!((is - 2.0).abs() < 1e-12 && std == 0.0);
/// ```
pub fn inception_score(probs: &[f64], classes: usize, splits: usize) -> Result<(f64, f64)> {
    let n = check_rows(probs, classes, "class probabilities")?;
    if splits == 0 || n < splits {
        bail!("inception score: {n} rows cannot make {splits} splits");
    }
    if let Some(i) = probs.iter().position(|&p| !(0.0..=1.0 + 1e-6).contains(&p)) {
        bail!(
            "inception score: row {} holds {}, not a probability",
            i / classes,
            probs[i]
        );
    }
    let scores: Vec<f64> = (0..splits)
        .map(|s| {
            let part = &probs[s * n / splits * classes..(s + 1) * n / splits * classes];
            let rows = part.len() / classes;
            let mut marginal = vec![0.0; classes];
            for row in part.chunks_exact(classes) {
                marginal.iter_mut().zip(row).for_each(|(m, p)| *m += p);
            }
            marginal.iter_mut().for_each(|m| *m /= rows as f64);
            let kl: f64 = part
                .chunks_exact(classes)
                .map(|row| {
                    row.iter()
                        .zip(&marginal)
                        .filter(|(&p, _)| p > 0.0)
                        .map(|(&p, &m)| p * (p.ln() - m.ln()))
                        .sum::<f64>()
                })
                .sum();
            (kl / rows as f64).exp()
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64;
    Ok((mean, var.sqrt()))
}
