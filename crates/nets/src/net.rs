//! The interface every network of this crate implements.

use candle_core::{Result, Tensor};
use scoreguide_guidance::Cond;

/// A network conditioned on a scalar noise level and, where it reads one, a per-row
/// condition: `F(x_in: [B, ...], c_noise: [B], cond)`. A network ignores the fields of
/// the condition it does not use.
pub trait NoiseNet {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor>;
    /// Size of the last output dimension.
    fn out_dim(&self) -> usize;
}

impl<N: NoiseNet + ?Sized> NoiseNet for Box<N> {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        (**self).forward(x, c_noise, cond)
    }
    fn out_dim(&self) -> usize {
        (**self).out_dim()
    }
}

impl<N: NoiseNet + ?Sized> NoiseNet for &N {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, cond: &Cond) -> Result<Tensor> {
        (**self).forward(x, c_noise, cond)
    }
    fn out_dim(&self) -> usize {
        (**self).out_dim()
    }
}
