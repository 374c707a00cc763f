use candle_core::{bail, DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use scoreguide_guidance::{check_batch, Cond, Score};

/// A mixture of Gaussians with diagonal covariances. Noised by σ, component k becomes
/// N(μ_k, diag(v_k) + σ² I), so the density and score are known in closed form at every σ.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianMixture {
    weights: Vec<f64>,
    means: Vec<Vec<f64>>,
    vars: Vec<Vec<f64>>,
}

impl GaussianMixture {
    /// `weights` (normalised here), `means[k]` and per-dimension standard deviations `stds[k]`.
    pub fn new(weights: Vec<f64>, means: Vec<Vec<f64>>, stds: Vec<Vec<f64>>) -> Result<Self> {
        let k = weights.len();
        if k == 0 || means.len() != k || stds.len() != k {
            bail!("Gaussian mixture: need the same positive number of weights, means and stds, got {k}, {}, {}", means.len(), stds.len());
        }
        let d = means[0].len();
        if d == 0 || means.iter().chain(stds.iter()).any(|v| v.len() != d) {
            bail!("Gaussian mixture: every mean and std vector must have the same positive length");
        }
        if weights.iter().any(|w| !(*w > 0.0 && w.is_finite())) {
            bail!("Gaussian mixture: weights must be positive, got {weights:?}");
        }
        if stds.iter().flatten().any(|s| !(*s > 0.0 && s.is_finite())) {
            bail!("Gaussian mixture: standard deviations must be positive");
        }
        let total: f64 = weights.iter().sum();
        Ok(Self {
            weights: weights.iter().map(|w| w / total).collect(),
            means,
            vars: stds
                .iter()
                .map(|s| s.iter().map(|v| v * v).collect())
                .collect(),
        })
    }

    pub fn dim(&self) -> usize {
        self.means[0].len()
    }

    /// Mean of the (noised or not) mixture.
    pub fn mean(&self) -> Vec<f64> {
        (0..self.dim())
            .map(|j| {
                self.weights
                    .iter()
                    .zip(&self.means)
                    .map(|(w, m)| w * m[j])
                    .sum()
            })
            .collect()
    }

    /// Covariance of the mixture noised by σ: Σ_k w_k (diag(v_k) + σ²I + μ_k μ_kᵀ) − μ μᵀ.
    pub fn covariance(&self, sigma: f64) -> Vec<Vec<f64>> {
        let d = self.dim();
        let mu = self.mean();
        let mut c = vec![vec![0.0; d]; d];
        for ((w, m), v) in self.weights.iter().zip(&self.means).zip(&self.vars) {
            for i in 0..d {
                for j in 0..d {
                    c[i][j] += w * (m[i] * m[j] + if i == j { v[i] + sigma * sigma } else { 0.0 });
                }
            }
        }
        for i in 0..d {
            for j in 0..d {
                c[i][j] -= mu[i] * mu[j];
            }
        }
        c
    }

    /// log p_σ(x).
    pub fn log_density(&self, x: &[f64], sigma: f64) -> f64 {
        let logs = self.component_logs(x, sigma);
        log_sum_exp(&logs)
    }

    fn component_logs(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        let s2 = sigma * sigma;
        self.weights
            .iter()
            .zip(&self.means)
            .zip(&self.vars)
            .map(|((w, m), v)| {
                let mut l = w.ln();
                for j in 0..x.len() {
                    let var = v[j] + s2;
                    l -= 0.5
                        * ((x[j] - m[j]).powi(2) / var
                            + var.ln()
                            + (2.0 * std::f64::consts::PI).ln());
                }
                l
            })
            .collect()
    }

    /// ∇x log p_σ(x) for one point, with responsibilities in log space (no underflow).
    pub fn score_at(&self, x: &[f64], sigma: f64) -> Vec<f64> {
        let logs = self.component_logs(x, sigma);
        let lse = log_sum_exp(&logs);
        let s2 = sigma * sigma;
        let mut g = vec![0.0; x.len()];
        for ((l, m), v) in logs.iter().zip(&self.means).zip(&self.vars) {
            let r = (l - lse).exp();
            for j in 0..x.len() {
                g[j] -= r * (x[j] - m[j]) / (v[j] + s2);
            }
        }
        g
    }

    /// `n` samples of the clean mixture, drawn from a generator seeded by `seed`.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Tensor> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = self.dim();
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut k = self.weights.len() - 1;
            for (i, w) in self.weights.iter().enumerate() {
                acc += w;
                if u < acc {
                    k = i;
                    break;
                }
            }
            for j in 0..d {
                let z: f64 = StandardNormal.sample(&mut rng);
                out.push((self.means[k][j] + self.vars[k][j].sqrt() * z) as f32);
            }
        }
        Tensor::from_vec(out, (n, d), &Device::Cpu)
    }
}

fn log_sum_exp(v: &[f64]) -> f64 {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m + v.iter().map(|l| (l - m).exp()).sum::<f64>().ln()
}

impl Score for GaussianMixture {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
        check_batch(x, sigma)?;
        let (b, d) = x.dims2()?;
        if d != self.dim() {
            bail!(
                "Gaussian mixture score: x has dimension {d}, the mixture {}",
                self.dim()
            );
        }
        let xs = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let ss = sigma.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut out = Vec::with_capacity(b * d);
        for (row, s) in xs.iter().zip(ss) {
            out.extend(self.score_at(row, s));
        }
        Tensor::from_vec(out, (b, d), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn score_matches_finite_differences_of_log_density() {
        let gm = GaussianMixture::new(
            vec![0.3, 0.7],
            vec![vec![-2.0, 1.0], vec![1.5, -0.5]],
            vec![vec![0.5, 1.0], vec![0.3, 0.2]],
        )
        .unwrap();
        for sigma in [1e-3, 0.1, 1.0, 30.0] {
            let x = [0.3, 0.4];
            let g = gm.score_at(&x, sigma);
            let h = 1e-5 * (1.0 + sigma);
            for j in 0..2 {
                let mut xp = x;
                let mut xm = x;
                xp[j] += h;
                xm[j] -= h;
                let fd = (gm.log_density(&xp, sigma) - gm.log_density(&xm, sigma)) / (2.0 * h);
                assert_relative_eq!(g[j], fd, max_relative = 1e-5, epsilon = 1e-8);
            }
        }
    }

    #[test]
    fn no_underflow_far_from_every_component_at_tiny_sigma() {
        let gm = GaussianMixture::new(
            vec![1.0, 1.0],
            vec![vec![0.0], vec![10.0]],
            vec![vec![0.01], vec![0.01]],
        )
        .unwrap();
        let g = gm.score_at(&[5.001], 1e-3);
        assert!(g[0].is_finite() && g[0] > 0.0);
    }
}
