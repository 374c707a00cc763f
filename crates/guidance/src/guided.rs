//! Guidance as addition of log-densities.

use crate::cond::{nonzero_rows, Cond, NO_COND};
use crate::score::{check_batch, per_sample, Score};
use candle_core::{bail, DType, Result, Tensor, Var, D};

/// log sigmoid(z) = min(z, 0) − ln(1 + e^{−|z|}): stable for large |z|, and built from
/// ops that all have a backward pass (so it can be guided and trained through).
pub fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    let soft = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    z.minimum(0.0)? - soft
}

/// log softmax over the last dimension from basic ops (every op has a backward).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `[B, K]` one-hot rows for labels `[B]` (u32), in `dtype`.
pub fn one_hot(labels: &Tensor, k: usize, dtype: DType) -> Result<Tensor> {
    let l = labels.to_dtype(DType::U32)?;
    let n = l.dim(0)?;
    let ids: Vec<u32> = l.to_vec1()?;
    if let Some(bad) = ids.iter().find(|&&c| c as usize >= k) {
        bail!("label {bad} is out of range for {k} classes");
    }
    let mut v = vec![0f32; n * k];
    for (i, c) in ids.iter().enumerate() {
        v[i * k + *c as usize] = 1.0;
    }
    Tensor::from_vec(v, (n, k), labels.device())?.to_dtype(dtype)
}

/// A differentiable log-probability term log p(x; σ | cond), one value per sample: `[B]`.
/// Each sample's value must depend on that sample (and its row of the condition) alone,
/// so that the gradient of the batch sum is the per-sample gradient.
///
/// Implement [`LogProb::log_prob_with`]; callers without a condition use
/// [`LogProb::log_prob`].
pub trait LogProb {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor>;

    /// ∇x log p(x; σ | cond) computed without autograd, when the term knows how (a
    /// hand-written backward pass is several times cheaper than candle's generic one).
    /// `None` means "use autograd"; an implementation must agree with autograd of
    /// [`LogProb::log_prob_with`].
    fn input_gradient(&self, _x: &Tensor, _sigma: &Tensor, _cond: &Cond) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// [`LogProb::log_prob_with`] without a condition.
    fn log_prob(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        self.log_prob_with(x, sigma, &NO_COND)
    }
}

macro_rules! forward_log_prob {
    ($($ty:ty),*) => {$(
        impl<L: LogProb + ?Sized> LogProb for $ty {
            fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
                (**self).log_prob_with(x, sigma, cond)
            }
            fn input_gradient(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Option<Tensor>> {
                (**self).input_gradient(x, sigma, cond)
            }
        }
    )*};
}
forward_log_prob!(&L, Box<L>, std::sync::Arc<L>);

/// A term switched off above `sigma_max`: log p(x; σ) for σ ≤ `sigma_max`, 0 above (so
/// its gradient vanishes there). Guidance at large σ can cost likelihood for nothing, or
/// (with a classifier that is not flat at large σ) throw samples off; this keeps a term
/// to the noise levels where it helps.
///
/// The term runs on the rows at or below the gate only (their rows of x, σ and the
/// condition): a sampler's step, whose rows share one σ, costs nothing above the gate,
/// and a training batch with σ drawn per row pays for the term on its gated rows alone.
pub struct Gated<L> {
    pub term: L,
    pub sigma_max: f64,
}

/// Which rows a gate keeps: all of them, none, or these (u32 indices).
enum Rows {
    All,
    None,
    Some(Tensor),
}

impl<L: LogProb> Gated<L> {
    pub fn new(term: L, sigma_max: f64) -> Self {
        Self { term, sigma_max }
    }

    /// The rows with σ ≤ `sigma_max` (compared in σ's dtype).
    fn rows(&self, sigma: &Tensor) -> Result<Rows> {
        let keep = sigma.le(self.sigma_max)?;
        Ok(match nonzero_rows(&keep)? {
            None => Rows::None,
            Some(r) if r.dim(0)? == sigma.dim(0)? => Rows::All,
            Some(r) => Rows::Some(r),
        })
    }
}

impl<L: LogProb> LogProb for Gated<L> {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        check_batch(x, sigma)?;
        match self.rows(sigma)? {
            Rows::None => Tensor::zeros(x.dim(0)?, x.dtype(), x.device()),
            Rows::All => self.term.log_prob_with(x, sigma, cond),
            Rows::Some(r) => {
                let lp = self.term.log_prob_with(
                    &x.index_select(&r, 0)?,
                    &sigma.index_select(&r, 0)?,
                    &cond.select(&r)?,
                )?;
                Tensor::zeros(x.dim(0)?, lp.dtype(), x.device())?.index_add(&r, &lp, 0)
            }
        }
    }

    fn input_gradient(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Option<Tensor>> {
        check_batch(x, sigma)?;
        match self.rows(sigma)? {
            Rows::None => Ok(Some(x.zeros_like()?)),
            Rows::All => self.term.input_gradient(x, sigma, cond),
            Rows::Some(r) => {
                let terms: [(f64, Box<dyn LogProb + '_>); 1] = [(1.0, Box::new(&self.term))];
                let g = grad_log_prob(
                    &terms,
                    &x.index_select(&r, 0)?,
                    &sigma.index_select(&r, 0)?,
                    &cond.select(&r)?,
                )?;
                Ok(Some(x.zeros_like()?.index_add(&r, &g, 0)?))
            }
        }
    }
}

/// Σ_k w_k ∇x log p_k(x; σ | cond): terms with a hand-written
/// [`LogProb::input_gradient`] use it; the others share one backward pass on an input
/// `Var` (terms built on frozen tensors make that pass compute the input gradient only).
pub fn grad_log_prob(
    terms: &[(f64, Box<dyn LogProb + '_>)],
    x: &Tensor,
    sigma: &Tensor,
    cond: &Cond,
) -> Result<Tensor> {
    check_batch(x, sigma)?;
    cond.check(x.dim(0)?)?;
    let mut sum = x.zeros_like()?;
    let mut rest = Vec::new();
    for (w, term) in terms {
        match term.input_gradient(x, sigma, cond)? {
            Some(g) => sum = (sum + (g * *w)?)?,
            None => rest.push((*w, term)),
        }
    }
    if rest.is_empty() {
        return Ok(sum);
    }
    let xv = Var::from_tensor(&x.detach())?;
    let mut total: Option<Tensor> = None;
    for (w, term) in rest {
        let lp = term.log_prob_with(xv.as_tensor(), sigma, cond)?;
        if lp.dims() != [x.dim(0)?] {
            bail!(
                "log-probability term returned shape {:?}, expected [{}]",
                lp.dims(),
                x.dim(0)?
            );
        }
        let s = (lp.sum_all()? * w)?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    let total = total.expect("at least one term is left for autograd");
    let grads = total.backward()?;
    match grads.get(xv.as_tensor()) {
        Some(g) => sum + g.detach(),
        // No path from x to these terms: their gradient is zero.
        None => Ok(sum),
    }
}

/// A base score plus weighted log-probability terms:
/// s(x; σ) + Σ_k w_k ∇x log p_k(x; σ). Itself a [`Score`], so guided models nest,
/// stack and feed every sampler and loss. The condition reaches the base and every term.
pub struct Guided<'a> {
    base: Box<dyn Score + 'a>,
    terms: Vec<(f64, Box<dyn LogProb + 'a>)>,
}

impl<'a> Guided<'a> {
    pub fn new(base: impl Score + 'a) -> Self {
        Self {
            base: Box::new(base),
            terms: Vec::new(),
        }
    }

    /// Adds the term `weight · log p(x; σ)`.
    pub fn with(mut self, weight: f64, term: impl LogProb + 'a) -> Self {
        self.terms.push((weight, Box::new(term)));
        self
    }

    pub fn push(&mut self, weight: f64, term: impl LogProb + 'a) {
        self.terms.push((weight, Box::new(term)));
    }

    pub fn len(&self) -> usize {
        self.terms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The guidance part alone, Σ_k w_k ∇x log p_k(x; σ | cond).
    pub fn guidance(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        grad_log_prob(&self.terms, x, sigma, cond)
    }
}

impl Score for Guided<'_> {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let base = self.base.score_with(x, sigma, cond)?;
        if self.terms.is_empty() {
            return Ok(base);
        }
        base + self.guidance(x, sigma, cond)?
    }

    fn denoise_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let base = self.base.denoise_with(x, sigma, cond)?;
        if self.terms.is_empty() {
            return Ok(base);
        }
        let s2 = per_sample(sigma, x)?.sqr()?;
        base + self.guidance(x, sigma, cond)?.broadcast_mul(&s2)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// log p(x) = −½‖x‖², whose gradient is −x, through autograd only.
    struct Gaussian;

    impl LogProb for Gaussian {
        fn log_prob_with(&self, x: &Tensor, _sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
            x.sqr()?.sum(1)? * -0.5
        }
    }

    #[test]
    fn gated_terms_vanish_above_their_noise_level() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, -2.0], [3.0, 0.5], [-1.0, 1.0]], &dev)?;
        let sigma = Tensor::new(&[0.5f64, 2.0, 1.0], &dev)?;
        let terms: Vec<(f64, Box<dyn LogProb>)> = vec![(1.0, Box::new(Gated::new(Gaussian, 1.0)))];
        let g = grad_log_prob(&terms, &x, &sigma, &Cond::none())?.to_vec2::<f64>()?;
        assert_eq!(g, vec![vec![-1.0, 2.0], vec![0.0, 0.0], vec![1.0, -1.0]]);
        let lp = Gated::new(Gaussian, 1.0)
            .log_prob(&x, &sigma)?
            .to_vec1::<f64>()?;
        assert_eq!(lp, vec![-2.5, 0.0, -1.0]);
        Ok(())
    }

    /// Fails the test if evaluated.
    struct MustNotRun;

    impl LogProb for MustNotRun {
        fn log_prob_with(&self, _x: &Tensor, _sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
            panic!("a term gated off on every row was evaluated")
        }
        fn input_gradient(
            &self,
            _x: &Tensor,
            _sigma: &Tensor,
            _cond: &Cond,
        ) -> Result<Option<Tensor>> {
            panic!("a term gated off on every row was evaluated")
        }
    }

    #[test]
    fn a_batch_wholly_above_the_gate_skips_the_term() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, -2.0], [3.0, 0.5]], &dev)?;
        let sigma = Tensor::new(&[2.0f32, 2.0], &dev)?;
        let terms: Vec<(f64, Box<dyn LogProb>)> =
            vec![(1.0, Box::new(Gated::new(MustNotRun, 1.0)))];
        let g = grad_log_prob(&terms, &x, &sigma, &Cond::none())?.to_vec2::<f32>()?;
        assert_eq!(g, vec![vec![0.0, 0.0]; 2]);
        let lp = Gated::new(MustNotRun, 1.0).log_prob(&x, &sigma)?;
        assert_eq!(lp.to_vec1::<f32>()?, vec![0.0, 0.0]);
        Ok(())
    }

    /// log p = Σ_j x_j · label: depends on the row's label, records the rows it saw.
    struct ByLabel(std::cell::Cell<usize>);

    impl LogProb for ByLabel {
        fn log_prob_with(&self, x: &Tensor, _sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
            self.0.set(x.dim(0)?);
            let l = cond.require_labels("ByLabel")?.to_dtype(x.dtype())?;
            x.sum(1)? * l
        }
    }

    #[test]
    fn a_gate_hands_its_term_the_gated_rows_of_the_condition() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, 1.0], [2.0, 2.0], [3.0, 3.0]], &dev)?;
        let sigma = Tensor::new(&[0.5f32, 2.0, 0.1], &dev)?;
        let cond = Cond::labels(Tensor::new(&[10u32, 20, 30], &dev)?);
        let gated = Gated::new(ByLabel(std::cell::Cell::new(0)), 1.0);
        let lp = gated.log_prob_with(&x, &sigma, &cond)?.to_vec1::<f32>()?;
        assert_eq!(lp, vec![20.0, 0.0, 180.0]);
        assert_eq!(
            gated.term.0.get(),
            2,
            "the term ran on the two gated rows only"
        );
        let terms: Vec<(f64, Box<dyn LogProb>)> = vec![(2.0, Box::new(&gated))];
        let g = grad_log_prob(&terms, &x, &sigma, &cond)?.to_vec2::<f32>()?;
        assert_eq!(g, vec![vec![20.0, 20.0], vec![0.0, 0.0], vec![60.0, 60.0]]);
        // A condition of the wrong batch is refused, naming the field.
        let short = Cond::labels(Tensor::new(&[1u32], &dev)?);
        let err = grad_log_prob(&terms, &x, &sigma, &short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("labels"), "{err}");
        Ok(())
    }

    #[test]
    fn a_gated_log_prob_keeps_its_gradient_through_the_row_selection() -> Result<()> {
        // Autograd through Gated::log_prob_with on mixed rows: ∇ of −½‖x‖² on the rows
        // at or below the gate, 0 above it.
        let dev = Device::Cpu;
        let x = Var::new(&[[1.0f64, -2.0], [3.0, 0.5], [-1.0, 1.0]], &dev)?;
        let sigma = Tensor::new(&[0.5f64, 2.0, 1.0], &dev)?;
        let lp = Gated::new(Gaussian, 1.0).log_prob_with(x.as_tensor(), &sigma, &Cond::none())?;
        let grads = lp.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("x has a gradient");
        assert_eq!(
            g.to_vec2::<f64>()?,
            vec![vec![-1.0, 2.0], vec![0.0, 0.0], vec![1.0, -1.0]]
        );
        Ok(())
    }
}
