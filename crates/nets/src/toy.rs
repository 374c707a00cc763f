//! DLSM's toy networks (DLSM App. A.6, from the authors' code): a two-branch ReLU MLP that
//! sees the raw noise level, as a score model ([`ToyScore`]) or a K-class classifier
//! ([`ToyClassifier`]).

use candle_core::{bail, Result, Tensor};
use candle_nn::{linear, Linear, Module, VarBuilder};
use scoreguide_guidance::{check_batch, log_softmax, one_hot, Cond, LogProb, Score};
use serde::{Deserialize, Serialize};

/// Shape of a [`ToyMlp`]: data dimension in, `out_dim` values out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ToyMlpConfig {
    pub in_dim: usize,
    pub out_dim: usize,
}

impl ToyMlpConfig {
    pub fn build(&self, vb: &VarBuilder) -> Result<ToyMlp> {
        if self.in_dim == 0 || self.out_dim == 0 {
            bail!("toy MLP: in_dim and out_dim must be positive, got {self:?}");
        }
        Ok(ToyMlp {
            x: [
                linear(self.in_dim, 256, vb.pp("x1"))?,
                linear(256, 128, vb.pp("x2"))?,
                linear(128, 64, vb.pp("x3"))?,
            ],
            s: [
                linear(1, 64, vb.pp("s1"))?,
                linear(64, 32, vb.pp("s2"))?,
                linear(32, 16, vb.pp("s3"))?,
            ],
            head: linear(80, self.out_dim, vb.pp("head"))?,
            cfg: *self,
        })
    }
}

/// x-branch d→256→ReLU→128→ReLU→64, σ-branch (raw σ) 1→64→ReLU→32→ReLU→16,
/// concatenated (80) → Linear → `out_dim`.
pub struct ToyMlp {
    x: [Linear; 3],
    s: [Linear; 3],
    head: Linear,
    cfg: ToyMlpConfig,
}

/// The x-branch's activations kept for the backward pass.
struct Trace {
    relu_masks: [Tensor; 2],
}

impl ToyMlp {
    pub fn config(&self) -> ToyMlpConfig {
        self.cfg
    }

    fn branch(layers: &[Linear; 3], h: &Tensor, masks: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let a1 = layers[0].forward(h)?;
        let h1 = a1.relu()?;
        let a2 = layers[1].forward(&h1)?;
        let h2 = a2.relu()?;
        if let Some(m) = masks {
            // ReLU' as 0/1 masks: constants, so the backward pass below stays
            // differentiable in the weights (a.e. exact).
            m.push(a1.gt(0.0)?.to_dtype(a1.dtype())?);
            m.push(a2.gt(0.0)?.to_dtype(a2.dtype())?);
        }
        layers[2].forward(&h2)
    }

    fn forward_traced(&self, x: &Tensor, sigma: &Tensor) -> Result<(Tensor, Trace)> {
        check_batch(x, sigma)?;
        if x.rank() != 2 || x.dim(1)? != self.cfg.in_dim {
            bail!(
                "toy MLP: input must be [batch, {}], got {:?}",
                self.cfg.in_dim,
                x.dims()
            );
        }
        let s = sigma.to_dtype(x.dtype())?.unsqueeze(1)?;
        let mut masks = Vec::with_capacity(2);
        let hx = Self::branch(&self.x, x, Some(&mut masks))?;
        let hs = Self::branch(&self.s, &s, None)?;
        let out = self.head.forward(&Tensor::cat(&[&hx, &hs], 1)?)?;
        let [m1, m2]: [Tensor; 2] = masks.try_into().expect("two masks pushed");
        Ok((
            out,
            Trace {
                relu_masks: [m1, m2],
            },
        ))
    }

    /// `[B, out_dim]` for `x: [B, in_dim]` and `sigma: [B]`.
    pub fn forward(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        Ok(self.forward_traced(x, sigma)?.0)
    }

    /// The output and the vector–Jacobian product (∂out/∂x)ᵀ v, where `cotangent(out)`
    /// gives v: `[B, out_dim]`. The product is built from ordinary tensor ops on the
    /// weights, so it can itself be differentiated with respect to them (the DLSM loss
    /// needs exactly this second-order path) without candle's detaching backward.
    pub fn forward_and_vjp(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        cotangent: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (out, trace) = self.forward_traced(x, sigma)?;
        let v = cotangent(&out)?;
        // head: out = [hx, hs] Wᵀ + b → ∂/∂hx = v W[:, :64].
        let w_head = self.head.weight().narrow(1, 0, 64)?;
        let g = v.matmul(&w_head)?;
        let g = (g.matmul(self.x[2].weight())? * &trace.relu_masks[1])?;
        let g = (g.matmul(self.x[1].weight())? * &trace.relu_masks[0])?;
        let g = g.matmul(self.x[0].weight())?;
        Ok((out, g))
    }
}

/// The toy MLP as a network of the registry ([`crate::NetConfig::ToyMlp`]): the noise
/// condition is the raw σ.
impl crate::net::NoiseNet for ToyMlp {
    fn forward(&self, x: &Tensor, c_noise: &Tensor, _cond: &Cond) -> Result<Tensor> {
        ToyMlp::forward(self, x, c_noise)
    }
    fn out_dim(&self) -> usize {
        self.cfg.out_dim
    }
}

/// Score model s(x; σ) = F(x, σ): the network's output is the score itself.
pub struct ToyScore(pub ToyMlp);

impl Score for ToyScore {
    fn score_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
        self.0.forward(x, sigma)
    }
}

/// Noise-conditioned K-class classifier p_φ(y | x; σ) on a [`ToyMlp`] (raw σ input).
pub struct ToyClassifier(pub ToyMlp);

impl ToyClassifier {
    pub fn classes(&self) -> usize {
        self.0.config().out_dim
    }

    /// log p(y | x; σ) for every class: `[B, K]`.
    pub fn log_probs(&self, x: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        log_softmax(&self.0.forward(x, sigma)?)
    }

    /// (log p(y_i | x_i; σ_i) `[B]`, ∇x log p(y_i | x_i; σ_i) `[B, d]`) for labels `[B]`.
    /// The gradient is differentiable with respect to the classifier's weights: the
    /// DLSM loss trains through it.
    pub fn log_prob_and_input_grad(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        labels: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let k = self.classes();
        let onehot = one_hot(labels, k, x.dtype())?;
        let mut logp = None;
        let (_, g) = self.0.forward_and_vjp(x, sigma, |logits| {
            let lp = log_softmax(logits)?;
            // ∂ log p_y / ∂ logits = e_y − softmax.
            let v = (&onehot - lp.exp()?)?;
            logp = Some((lp * &onehot)?.sum(1)?);
            Ok(v)
        })?;
        Ok((logp.expect("cotangent ran"), g))
    }

    /// This classifier as a guidance term for class `class`: log p(class | x; σ).
    pub fn for_class(&self, class: u32) -> Result<ClassTerm<'_>> {
        if class as usize >= self.classes() {
            bail!(
                "class {class} is out of range for {} classes",
                self.classes()
            );
        }
        Ok(ClassTerm {
            classifier: self,
            class,
        })
    }
}

/// log p_φ(y = class | x; σ) as a [`LogProb`] guidance term.
pub struct ClassTerm<'a> {
    classifier: &'a ToyClassifier,
    class: u32,
}

impl ClassTerm<'_> {
    fn labels(&self, x: &Tensor) -> Result<Tensor> {
        Tensor::from_vec(vec![self.class; x.dim(0)?], x.dim(0)?, x.device())
    }
}

impl LogProb for ClassTerm<'_> {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Tensor> {
        let lp = self.classifier.log_probs(x, sigma)?;
        lp.narrow(1, self.class as usize, 1)?.squeeze(1)
    }

    fn input_gradient(&self, x: &Tensor, sigma: &Tensor, _cond: &Cond) -> Result<Option<Tensor>> {
        let (_, g) = self
            .classifier
            .log_prob_and_input_grad(x, sigma, &self.labels(x)?)?;
        Ok(Some(g))
    }
}

/// log p_φ(y_i | x_i; σ_i) for each row's label in the condition: class-conditional
/// guidance with one classifier over a batch of mixed classes.
impl LogProb for ToyClassifier {
    fn log_prob_with(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Tensor> {
        let labels = cond.require_labels("toy classifier guidance")?;
        let onehot = one_hot(labels, self.classes(), x.dtype())?;
        (self.log_probs(x, sigma)? * onehot)?.sum(1)
    }

    fn input_gradient(&self, x: &Tensor, sigma: &Tensor, cond: &Cond) -> Result<Option<Tensor>> {
        let labels = cond.require_labels("toy classifier guidance")?;
        Ok(Some(self.log_prob_and_input_grad(x, sigma, labels)?.1))
    }
}
