//! The preconditioning adapters are exact: a network that outputs the ideal ε, x0,
//! score or EDM target for a known distribution, wrapped in `ScoreNet`, reproduces that
//! distribution's σ-space score, for every process (so VP / DDPM networks really enter
//! σ-space through `Precond`).

use candle_core::{DType, Device, Result, Tensor};
use scoreguide_data::GaussianMixture;
use scoreguide_guidance::Cond;
use scoreguide_guidance::Score;
use scoreguide_nets::{NoiseNet, Precond, ScoreNet};
use scoreguide_sde::Process;

/// Outputs the ideal raw network value for `precond`, recovering σ from the noise
/// condition the adapter passes in and x_σ from the scaled input.
struct IdealNet {
    target: GaussianMixture,
    precond: Precond,
}

impl IdealNet {
    fn sigma_of(&self, c: f64) -> f64 {
        match &self.precond {
            Precond::Edm { .. } => (4.0 * c).exp(),
            Precond::Identity => c,
            Precond::Eps { process } | Precond::X0 { process } | Precond::Score { process } => {
                match process {
                    Process::Ve { .. } | Process::Edm { .. } => (4.0 * c).exp(),
                    Process::Vp { .. } | Process::SubVp { .. } => process.sigma(c / 999.0),
                    Process::Ddpm(_) => process.sigma(c),
                }
            }
        }
    }
}

impl NoiseNet for IdealNet {
    fn forward(&self, x_in: &Tensor, c_noise: &Tensor, _cond: &Cond) -> Result<Tensor> {
        let xs = x_in.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let cs = c_noise.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mut out = Vec::new();
        for (row, c) in xs.iter().zip(cs) {
            let s = self.sigma_of(c);
            let (c_in, alpha) = match &self.precond {
                Precond::Edm { sigma_data } => {
                    (1.0 / (s * s + sigma_data * sigma_data).sqrt(), 1.0)
                }
                Precond::Eps { process } | Precond::X0 { process } | Precond::Score { process } => {
                    let a = process.alpha_at_sigma(s);
                    (a, a)
                }
                Precond::Identity => (1.0, 1.0),
            };
            let x: Vec<f64> = row.iter().map(|v| v / c_in).collect();
            let score = self.target.score_at(&x, s);
            let d: Vec<f64> = x.iter().zip(&score).map(|(x, g)| x + s * s * g).collect();
            for j in 0..x.len() {
                out.push(match &self.precond {
                    Precond::Edm { sigma_data: sd } => {
                        let r = (s * s + sd * sd).sqrt();
                        (d[j] - sd * sd / (r * r) * x[j]) / (s * sd / r)
                    }
                    Precond::Eps { .. } => (x[j] - d[j]) / s,
                    Precond::X0 { .. } => d[j],
                    Precond::Score { .. } | Precond::Identity => score[j] / alpha,
                });
            }
        }
        Tensor::from_vec(out, x_in.dims(), x_in.device())?.to_dtype(x_in.dtype())
    }
    fn out_dim(&self) -> usize {
        2
    }
}

#[test]
fn every_parameterisation_recovers_the_exact_score() {
    let target = GaussianMixture::new(
        vec![0.5, 0.5],
        vec![vec![-1.0, 0.0], vec![1.0, 1.0]],
        vec![vec![0.3, 0.5], vec![0.6, 0.2]],
    )
    .unwrap();
    let processes = [
        Process::ve(0.01, 50.0),
        Process::vp(0.1, 20.0),
        Process::sub_vp(0.1, 20.0),
        Process::edm(0.002, 80.0),
        Process::ddpm_linear(1000).unwrap(),
        Process::ddpm_cosine(1000).unwrap(),
    ];
    let mut preconds = vec![Precond::Edm { sigma_data: 0.5 }, Precond::Identity];
    for p in processes {
        preconds.push(Precond::Eps { process: p.clone() });
        preconds.push(Precond::X0 { process: p.clone() });
        preconds.push(Precond::Score { process: p });
    }
    let x = Tensor::new(&[[0.3f64, -0.2], [2.0, 1.5], [-1.2, 0.1]], &Device::Cpu).unwrap();
    for sigma in [0.05, 0.7, 3.0] {
        let sig = Tensor::full(sigma, 3, &Device::Cpu).unwrap();
        let exact = target.score(&x, &sig).unwrap().to_vec2::<f64>().unwrap();
        for precond in &preconds {
            let model = ScoreNet::new(
                IdealNet {
                    target: target.clone(),
                    precond: precond.clone(),
                },
                precond.clone(),
            )
            .unwrap();
            let got = model.score(&x, &sig).unwrap().to_vec2::<f64>().unwrap();
            let den = model.denoise(&x, &sig).unwrap().to_vec2::<f64>().unwrap();
            for i in 0..3 {
                for j in 0..2 {
                    let tol = 1e-6 * (1.0 + exact[i][j].abs());
                    assert!(
                        (got[i][j] - exact[i][j]).abs() < tol,
                        "{precond:?} σ={sigma}: score {} vs {}",
                        got[i][j],
                        exact[i][j]
                    );
                    let d = x.to_vec2::<f64>().unwrap()[i][j] + sigma * sigma * exact[i][j];
                    assert!(
                        (den[i][j] - d).abs() < 1e-6 * (1.0 + d.abs()),
                        "{precond:?} σ={sigma}: denoiser {} vs {d}",
                        den[i][j]
                    );
                }
            }
        }
    }
}
