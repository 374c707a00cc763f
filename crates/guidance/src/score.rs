use crate::cond::{Cond, NO_COND};
use candle_core::{bail, Result, Tensor};

/// A score function in σ-space, optionally conditioned per row.
///
/// Implement [`Score::score_with`]; callers without a condition use [`Score::score`].
pub trait Score {
    /// ∇x log p_σ(x | cond) for `x: [B, ...]`, `sigma: [B]` (σ > 0) and a condition
    /// whose fields have B rows (or none).
    fn score_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor>;

    /// Denoiser view D(x; σ) = x + σ² s(x; σ) ≈ E[x0 | x].
    fn denoise_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let s2 = per_sample(sigma, x)?.sqr()?;
        x + self.score_with(x, sigma, cond)?.broadcast_mul(&s2)?
    }

    /// [`Score::score_with`] without a condition.
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        self.score_with(x, sigma, &NO_COND)
    }

    /// [`Score::denoise_with`] without a condition.
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        self.denoise_with(x, sigma, &NO_COND)
    }
}

macro_rules! forward_score {
    ($($ty:ty),*) => {$(
        impl<S: Score + ?Sized> Score for $ty {
            fn score_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
                (**self).score_with(x, sigma, cond)
            }
            fn denoise_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
                (**self).denoise_with(x, sigma, cond)
            }
        }
    )*};
}
forward_score!(&S, Box<S>, std::sync::Arc<S>);

/// `sigma: [B]` reshaped to `[B, 1, …, 1]` with the rank of `x`, ready to broadcast.
pub fn per_sample(sigma: &Tensor, x: &Tensor) -> Result<Tensor> {
    check_batch(x, sigma)?;
    let mut shape = vec![1usize; x.rank()];
    shape[0] = x.dim(0)?;
    sigma.to_dtype(x.dtype())?.reshape(shape)
}

/// Checks that `sigma` is `[B]` for `x: [B, ...]`, with an error naming both shapes.
pub fn check_batch(x: &Tensor, sigma: &Tensor) -> Result<()> {
    if x.rank() < 2 {
        bail!(
            "score input x must be [batch, ...], got shape {:?}",
            x.dims()
        );
    }
    if sigma.rank() != 1 || sigma.dim(0)? != x.dim(0)? {
        bail!(
            "noise level sigma must be [batch] = [{}], got shape {:?}",
            x.dim(0)?,
            sigma.dims()
        );
    }
    Ok(())
}
