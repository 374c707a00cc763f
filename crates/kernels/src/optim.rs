//! Optimizer updates in one pass over a parameter, its gradient and its moments.
//!
//! Composed from candle's ops an Adam step makes a dozen passes (each allocating) over
//! every parameter; here it is one pass writing the new parameter and moments.

use crate::ops::{fast_path, output_buffer, with_data};
use crate::threads::chunk_len;
use candle_core::{Device, Result, Tensor};
use rayon::prelude::*;

/// The constants of one Adam step (bias corrections `1 − βᵗ` included).
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2: f64,
}

fn fast(ts: &[&Tensor]) -> bool {
    fast_path(ts) && ts.iter().all(|t| t.is_contiguous())
}

/// One Adam step: `(θ', m', v')` with m' = β1 m + (1 − β1) g, v' = β2 v + (1 − β2) g²,
/// θ' = θ (1 − lr·wd) − lr (m'/c1) / (sqrt(v'/c2) + ε).
pub fn adam_update(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    s: AdamStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !fast(&[theta, m, v, g]) || theta.dims() != g.dims() {
        let m = ((m * s.beta1)? + (g * (1.0 - s.beta1))?)?;
        let v = ((v * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
        let update = ((&m / s.bias_correction1)? / ((&v / s.bias_correction2)?.sqrt()? + s.eps)?)?;
        let mut theta = theta.clone();
        if s.weight_decay > 0.0 {
            theta = (&theta * (1.0 - s.lr * s.weight_decay))?;
        }
        return Ok(((theta - (update * s.lr)?)?, m, v));
    }
    let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
    let (c1, c2) = (
        1.0 / s.bias_correction1 as f32,
        1.0 / s.bias_correction2 as f32,
    );
    let (lr, eps) = (s.lr as f32, s.eps as f32);
    let decay = (1.0 - s.lr * s.weight_decay) as f32;
    let len = theta.elem_count();
    let (mut th, mut mm, mut vv) = (output_buffer(len), output_buffer(len), output_buffer(len));
    // Reads θ, m, v and g where they lie and writes the three results once.
    let update = |out: (&mut [f32], &mut [f32], &mut [f32]),
                  inp: (&[f32], &[f32], &[f32], &[f32])| {
        let (th, mm, vv) = out;
        let (t0, m0, v0, g) = inp;
        for i in 0..th.len() {
            let m = m0[i] * b1 + g[i] * (1.0 - b1);
            let v = v0[i] * b2 + g[i] * g[i] * (1.0 - b2);
            mm[i] = m;
            vv[i] = v;
            th[i] = t0[i] * decay - lr * (m * c1) / ((v * c2).sqrt() + eps);
        }
    };
    with_data(theta, |t0| {
        with_data(m, |m0| {
            with_data(v, |v0| {
                with_data(g, |g0| {
                    let chunk = chunk_len(len, 1);
                    if chunk >= len {
                        update((&mut th, &mut mm, &mut vv), (t0, m0, v0, g0));
                    } else {
                        th.par_chunks_mut(chunk)
                            .zip(mm.par_chunks_mut(chunk))
                            .zip(vv.par_chunks_mut(chunk))
                            .enumerate()
                            .for_each(|(i, ((th, mm), vv))| {
                                let r = i * chunk..i * chunk + th.len();
                                let inp = (&t0[r.clone()], &m0[r.clone()], &v0[r.clone()], &g0[r]);
                                update((th, mm, vv), inp);
                            });
                    }
                    Ok(())
                })
            })
        })
    })?;
    let shape = theta.shape();
    Ok((
        Tensor::from_vec(th, shape, &Device::Cpu)?,
        Tensor::from_vec(mm, shape, &Device::Cpu)?,
        Tensor::from_vec(vv, shape, &Device::Cpu)?,
    ))
}

/// The moving average `d·shadow + (1 − d)·θ`.
pub fn ema_update(shadow: &Tensor, theta: &Tensor, decay: f64) -> Result<Tensor> {
    if !fast(&[shadow, theta]) || shadow.dims() != theta.dims() {
        return (shadow * decay)? + (theta.detach() * (1.0 - decay))?;
    }
    let (d, e) = (decay as f32, (1.0 - decay) as f32);
    let mut out = output_buffer(shadow.elem_count());
    with_data(shadow, |s| {
        with_data(theta, |t| {
            for ((o, s), t) in out.iter_mut().zip(s).zip(t) {
                *o = s * d + t * e;
            }
            Ok(())
        })
    })?;
    Tensor::from_vec(out, shadow.shape(), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn fused_updates_match_the_composed_formulas() {
        let dev = Device::Cpu;
        let t = |v: &[f32]| Tensor::new(v, &dev).unwrap();
        let (theta, m, v, g) = (
            t(&[0.5, -1.0, 2.0]),
            t(&[0.1, 0.0, -0.2]),
            t(&[0.01, 0.0, 0.04]),
            t(&[0.3, -0.7, 1e-8]),
        );
        let s = AdamStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            bias_correction1: 1.0 - 0.9f64.powi(3),
            bias_correction2: 1.0 - 0.999f64.powi(3),
        };
        let fused = adam_update(&theta, &m, &v, &g, s).unwrap();
        let f64s = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let composed = adam_update(&f64s(&theta), &f64s(&m), &f64s(&v), &f64s(&g), s).unwrap();
        for (a, e) in [
            (&fused.0, &composed.0),
            (&fused.1, &composed.1),
            (&fused.2, &composed.2),
        ] {
            let a: Vec<f32> = a.to_vec1().unwrap();
            let e: Vec<f64> = e.to_vec1().unwrap();
            for (a, e) in a.iter().zip(&e) {
                assert!((*a as f64 - e).abs() < 1e-6 * (1.0 + e.abs()), "{a} vs {e}");
            }
        }
        let ema = ema_update(&theta, &g, 0.99).unwrap();
        let ema_ref = ema_update(&f64s(&theta), &f64s(&g), 0.99).unwrap();
        let (a, e): (Vec<f32>, Vec<f64>) = (ema.to_vec1().unwrap(), ema_ref.to_vec1().unwrap());
        for (a, e) in a.iter().zip(&e) {
            assert!((*a as f64 - e).abs() < 1e-6);
        }
    }
}
