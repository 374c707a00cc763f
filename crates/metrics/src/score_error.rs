//! DLSM's score errors (paper Eq. 7): how far an estimated posterior score
//! s_θ + k ∇x log p_φ(y | x) is from the true one, and its likelihood part from the true
//! likelihood score, averaged over evaluation points.

use crate::rows::check_rows;
use candle_core::{bail, Result};

/// Mean errors over the rows of `[n, d]` inputs, all evaluated at the same points:
/// `true_posterior` = ∇ log p(x | y), `true_prior` = ∇ log p(x) (e.g. Parzen scores),
/// `model_prior` = s_θ(x), `model_likelihood` = k ∇x log p_φ(y | x) (scale included).
/// Returns (D_P, D_L): D_P = mean ‖true_posterior − (model_prior + model_likelihood)‖,
/// D_L = mean ‖(true_posterior − true_prior) − model_likelihood‖.
///
/// ```
/// let t_post = [1.0, 0.0];
/// let t_prior = [0.5, 0.0];
/// let (dp, dl) = scoreguide_metrics::score_errors(&t_post, &t_prior, &[0.5, 0.0], &[0.5, 0.0], 2).unwrap();
/// assert_eq!((dp, dl), (0.0, 0.0));
/// ```
pub fn score_errors(
    true_posterior: &[f64],
    true_prior: &[f64],
    model_prior: &[f64],
    model_likelihood: &[f64],
    d: usize,
) -> Result<(f64, f64)> {
    let n = check_rows(true_posterior, d, "true posterior score")?;
    for (x, what) in [
        (true_prior, "true prior score"),
        (model_prior, "model prior score"),
        (model_likelihood, "model likelihood score"),
    ] {
        if check_rows(x, d, what)? != n {
            bail!(
                "score errors: {what} has {} rows, the true posterior score {n}",
                x.len() / d
            );
        }
    }
    let (mut dp, mut dl) = (0.0, 0.0);
    for i in 0..n {
        let r = i * d..(i + 1) * d;
        let (mut p2, mut l2) = (0.0, 0.0);
        for j in r {
            let e_p = true_posterior[j] - model_prior[j] - model_likelihood[j];
            let e_l = true_posterior[j] - true_prior[j] - model_likelihood[j];
            p2 += e_p * e_p;
            l2 += e_l * e_l;
        }
        dp += p2.sqrt();
        dl += l2.sqrt();
    }
    Ok((dp / n as f64, dl / n as f64))
}
