use candle_core::{bail, Result, Tensor};

/// A score function in σ-space.
pub trait Score {
    /// ∇x log p_σ(x) for `x: [B, ...]` and `sigma: [B]` (σ > 0).
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor>;

    /// Denoiser view D(x; σ) = x + σ² s(x; σ) ≈ E[x0 | x].
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        let s2 = per_sample(sigma, x)?.sqr()?;
        x + self.score(x, sigma)?.broadcast_mul(&s2)?
    }
}

impl<S: Score + ?Sized> Score for &S {
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).score(x, sigma)
    }
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).denoise(x, sigma)
    }
}

impl<S: Score + ?Sized> Score for Box<S> {
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).score(x, sigma)
    }
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).denoise(x, sigma)
    }
}

impl<S: Score + ?Sized> Score for std::sync::Arc<S> {
    fn score(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).score(x, sigma)
    }
    fn denoise(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        (**self).denoise(x, sigma)
    }
}

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
