//! From a raw network to a denoiser: EDM preconditioning and ε / x0 / score prediction.

use crate::net::NoiseNet;
use candle_core::{bail, DType, Result, Tensor};
use scoreguide_guidance::{check_batch, Cond, Score};
use scoreguide_sde::Process;
use serde::{Deserialize, Serialize};

/// How the network output becomes the denoiser D(x; σ) in σ-space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Precond {
    /// Karras et al. 2022: D = c_skip x + c_out F(c_in x, ¼ ln σ) with
    /// c_skip = σd²/(σ²+σd²), c_out = σ σd/sqrt(σ²+σd²), c_in = 1/sqrt(σ²+σd²).
    Edm { sigma_data: f64 },
    /// The network sees the process's own `x_t = α x` and its noise condition and
    /// predicts the noise ε: D = x − σ F.
    Eps { process: Process },
    /// As `Eps`, predicting the clean data: D = F.
    X0 { process: Process },
    /// As `Eps`, predicting the score of `x_t` in the process's own form:
    /// s_σ = α F (chain rule through x_t = α x).
    Score { process: Process },
    /// No preconditioning: the network sees x and the raw σ and its output is the score,
    /// s = F(x, σ) (DLSM's toy networks).
    Identity,
}

impl Precond {
    pub fn edm() -> Self {
        Self::Edm { sigma_data: 1.0 }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Edm { sigma_data } => {
                if !(*sigma_data > 0.0 && sigma_data.is_finite()) {
                    bail!("EDM preconditioning: sigma_data must be positive, got {sigma_data}");
                }
                Ok(())
            }
            Self::Eps { process } | Self::X0 { process } | Self::Score { process } => {
                process.validate()
            }
            Self::Identity => Ok(()),
        }
    }

    /// Per-sample (c_skip, c_out, c_in, c_noise) with D = c_skip x + c_out F(c_in x, c_noise).
    /// For `Score`, c_out turns F into the score itself and c_skip is unused.
    fn coefficients(&self, sigma: f64) -> [f64; 4] {
        match self {
            Self::Edm { sigma_data: sd } => {
                let r = (sigma * sigma + sd * sd).sqrt();
                [
                    sd * sd / (r * r),
                    sigma * sd / r,
                    1.0 / r,
                    0.25 * sigma.ln(),
                ]
            }
            Self::Eps { process } => {
                let a = process.alpha_at_sigma(sigma);
                [1.0, -sigma, a, process.noise_condition(sigma)]
            }
            Self::X0 { process } => {
                let a = process.alpha_at_sigma(sigma);
                [0.0, 1.0, a, process.noise_condition(sigma)]
            }
            Self::Score { process } => {
                let a = process.alpha_at_sigma(sigma);
                [0.0, a, a, process.noise_condition(sigma)]
            }
            Self::Identity => [0.0, 1.0, 1.0, sigma],
        }
    }
}

/// A network and its preconditioning: a [`Score`].
pub struct ScoreNet<N> {
    net: N,
    precond: Precond,
}

impl<N: NoiseNet> ScoreNet<N> {
    pub fn new(net: N, precond: Precond) -> Result<Self> {
        precond.validate()?;
        Ok(Self { net, precond })
    }

    pub fn net(&self) -> &N {
        &self.net
    }

    pub fn precond(&self) -> &Precond {
        &self.precond
    }

    /// (c_skip, c_out, c_in) shaped to broadcast over `x`, and c_noise: [B].
    fn coefficient_tensors(&self, x: &Tensor, sigma: &Tensor) -> Result<[Tensor; 4]> {
        check_batch(x, sigma)?;
        let s = sigma.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(bad) = s.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            bail!("noise level sigma must be finite and positive, got {bad}");
        }
        let b = s.len();
        let mut cols: [Vec<f64>; 4] = Default::default();
        for &si in &s {
            for (col, c) in cols.iter_mut().zip(self.precond.coefficients(si)) {
                col.push(c);
            }
        }
        let mut bshape = vec![1usize; x.rank()];
        bshape[0] = b;
        let dev = x.device();
        let mk = |v: &Vec<f64>, shape: &[usize]| -> Result<Tensor> {
            Tensor::from_slice(v, shape, dev)?.to_dtype(x.dtype())
        };
        Ok([
            mk(&cols[0], &bshape)?,
            mk(&cols[1], &bshape)?,
            mk(&cols[2], &bshape)?,
            mk(&cols[3], &[b])?,
        ])
    }

    fn raw(&self, x: &Tensor, c_in: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        cond.check(x.dim(0)?)?;
        let f = self.net.forward(&x.broadcast_mul(c_in)?, c_noise, cond)?;
        if f.dims() != x.dims() {
            bail!(
                "score network output has shape {:?}, input has {:?}: a score model needs out_dim equal to the data dimension",
                f.dims(),
                x.dims()
            );
        }
        Ok(f)
    }
}

impl<N: NoiseNet> Score for ScoreNet<N> {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let [c_skip, c_out, c_in, c_noise] = self.coefficient_tensors(x, sigma)?;
        let f = self.raw(x, &c_in, &c_noise, cond)?.broadcast_mul(&c_out)?;
        if let Precond::Score { .. } | Precond::Identity = self.precond {
            return Ok(f);
        }
        let d = (x.broadcast_mul(&c_skip)? + f)?;
        let s2 = scoreguide_guidance::per_sample(sigma, x)?.sqr()?;
        (d - x)?.broadcast_div(&s2)
    }

    fn denoise_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let [c_skip, c_out, c_in, c_noise] = self.coefficient_tensors(x, sigma)?;
        let f = self.raw(x, &c_in, &c_noise, cond)?.broadcast_mul(&c_out)?;
        if let Precond::Score { .. } | Precond::Identity = self.precond {
            let s2 = scoreguide_guidance::per_sample(sigma, x)?.sqr()?;
            return x + f.broadcast_mul(&s2)?;
        }
        x.broadcast_mul(&c_skip)? + f
    }
}
