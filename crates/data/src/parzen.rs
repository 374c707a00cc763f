//! The Parzen (kernel density) score of a point set: the exact score of the empirical
//! distribution convolved with N(0, σ² I), DLSM's oracle (§3).

use candle_core::{bail, DType, Result, Tensor};
use scoreguide_guidance::{check_batch, Cond, Score};

/// s(x; σ) = Σ_i w_i (x_i − x)/σ² with w = softmax_i(−‖x − x_i‖²/(2σ²)), computed in f64
/// with the log-sum-exp shift, so it neither underflows at small σ nor overflows far away.
#[derive(Debug, Clone)]
pub struct Parzen {
    points: Vec<f64>,
    dim: usize,
}

impl Parzen {
    /// From `points: [N, d]` (any float dtype); `what` names the set in errors.
    pub fn new(points: &Tensor, what: &str) -> Result<Self> {
        let (n, dim) = points.dims2().map_err(|_| {
            candle_core::Error::msg(format!(
                "{what}: need [N, d] points, got {:?}",
                points.dims()
            ))
        })?;
        if n == 0 {
            bail!("{what}: no points");
        }
        let points: Vec<f64> = points.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        if points.iter().any(|v| !v.is_finite()) {
            bail!("{what}: points hold NaN or infinite values");
        }
        Ok(Self { points, dim })
    }

    pub fn len(&self) -> usize {
        self.points.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The score at one point `x` (length d) and noise level σ.
    pub fn score_at(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        let d = self.dim;
        let inv = -0.5 / (sigma * sigma);
        let logw: Vec<f64> = self
            .points
            .chunks_exact(d)
            .map(|p| p.iter().zip(x).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() * inv)
            .collect();
        let m = logw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        let mut acc = vec![0.0; d];
        for (p, lw) in self.points.chunks_exact(d).zip(&logw) {
            let w = (lw - m).exp();
            total += w;
            for ((a, pi), xi) in acc.iter_mut().zip(p).zip(x) {
                *a += w * (pi - xi);
            }
        }
        let scale = 1.0 / (total * sigma * sigma);
        acc.iter().map(|a| a * scale).collect()
    }
}

impl Score for Parzen {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
        check_batch(x, sigma)?;
        let (b, d) = x.dims2()?;
        if d != self.dim {
            bail!(
                "Parzen score: points have {} dimensions, x has {d}",
                self.dim
            );
        }
        let xs: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let ss: Vec<f64> = sigma.to_dtype(DType::F64)?.to_vec1()?;
        let out: Vec<f64> = xs
            .chunks_exact(d)
            .zip(&ss)
            .flat_map(|(row, &s)| self.score_at(row, s))
            .collect();
        Tensor::from_vec(out, (b, d), x.device())?.to_dtype(x.dtype())
    }
}
