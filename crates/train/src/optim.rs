//! Adam with state that can be saved, EMA, and gradient-norm clipping.

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Tensor, Var};
use scoreguide_kernels::{adam_update, ema_update, AdamStep};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Adam hyper-parameters. `weight_decay` is decoupled (AdamW) and 0 by default: candle's
/// own `ParamsAdamW::default()` has 0.01, which is not Adam.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Adam over named variables; its moments are public so checkpoints can hold them.
pub struct Adam {
    pub config: AdamConfig,
    vars: Vec<(String, Var)>,
    /// First and second moments, by variable name.
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
    /// Number of updates applied so far.
    pub t: u64,
}

impl Adam {
    pub fn new(vars: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in &vars {
            m.insert(name.clone(), var.zeros_like()?);
            v.insert(name.clone(), var.zeros_like()?);
        }
        Ok(Self {
            config,
            vars,
            m,
            v,
            t: 0,
        })
    }

    /// One update with learning rate `lr`. A variable without a gradient is left as is.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let step = AdamStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bias_correction1: bc1,
            bias_correction2: bc2,
        };
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A gradient can carry the graph it was computed from (when the loss itself
            // contains a gradient, as DLSM's does); detached, the moments cannot chain
            // every step's graph into the next (that leaked ~50 MB per DLSM step).
            let g = g.detach();
            let m = self.m.get_mut(name).expect("moments created for every var");
            let v = self.v.get_mut(name).expect("moments created for every var");
            let (theta, m_next, v_next) = adam_update(var.as_tensor(), m, v, &g, step)?;
            *m = m_next;
            *v = v_next;
            var.set(&theta)?;
        }
        Ok(())
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }
}

/// Exponential moving average of parameters: θ̄ ← d_t θ̄ + (1 − d_t) θ, with the usual
/// warm-up d_t = min(decay, (1 + t)/(10 + t)) so that early in training the average is
/// not dominated by the random initial weights.
pub struct Ema {
    pub decay: f64,
    pub shadow: BTreeMap<String, Tensor>,
    /// Updates applied so far.
    pub updates: u64,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            bail!("EMA decay must be in [0, 1), got {decay}");
        }
        Ok(Self {
            decay,
            shadow: vars
                .iter()
                // A copy: a detached view would share the variable's storage and
                // follow its updates, so the average would start from later weights.
                .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
                .collect::<Result<_>>()?,
            updates: 0,
        })
    }

    /// The decay the next update uses.
    pub fn current_decay(&self) -> f64 {
        let t = self.updates as f64;
        self.decay.min((1.0 + t) / (10.0 + t))
    }

    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        let d = self.current_decay();
        for (name, var) in vars {
            let s = self
                .shadow
                .get_mut(name)
                .expect("shadow created for every var");
            *s = ema_update(s, &var.as_tensor().detach(), d)?;
        }
        self.updates += 1;
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars`; an error naming the first parameter
/// whose gradient holds NaN or an infinity.
pub fn grad_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut total = 0f64;
    for (name, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if !s.is_finite() {
                bail!("the gradient of `{name}` holds NaN or infinite values");
            }
            total += s;
        }
    }
    Ok(total.sqrt())
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`;
/// returns the norm before clipping (an error naming the parameter if one is not finite).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for (_, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ema_starts_from_the_weights_it_was_made_with() -> Result<()> {
        let var = Var::from_slice(&[1f32, 2.0], 2, &Device::Cpu)?;
        let vars = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(&vars, 0.999)?;
        var.set(&Tensor::new(&[11f32, 12.0], &Device::Cpu)?)?;
        // The shadow kept the initial weights through the variable's update ...
        assert_eq!(ema.shadow["w"].to_vec1::<f32>()?, [1.0, 2.0]);
        // ... and the first update mixes them at its warm-up decay 1/10.
        ema.update(&vars)?;
        let got = ema.shadow["w"].to_vec1::<f32>()?;
        for (g, want) in got
            .iter()
            .zip([0.1 * 1.0 + 0.9 * 11.0, 0.1 * 2.0 + 0.9 * 12.0])
        {
            assert!((g - want).abs() < 1e-5, "{got:?}");
        }
        Ok(())
    }
}
