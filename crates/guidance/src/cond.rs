//! Per-row model inputs besides x and σ.

use candle_core::{bail, DType, Device, Result, Tensor};

/// What a model is conditioned on, row by row: a class or action label, a context tensor
/// (a map raster, an embedding) and a mask (which agents or frames are real). Every
/// field present has the batch's rows as its first dimension; an absent field is
/// absent for every row. A network reads what it uses and ignores the rest.
///
/// This is what k-diffusion passes as `extra_args`: one value handed through every
/// score, guidance term, loss, sampler and trainer, so conditional and unconditional
/// models share them. Unconditioned code calls [`crate::Score::score`] and never sees
/// it.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use scoreguide_guidance::Cond;
/// let dev = Device::Cpu;
/// let cond = Cond::labels(Tensor::new(&[3u32, 1, 4], &dev)?);
/// let rows = Tensor::new(&[2u32, 0], &dev)?;
/// assert_eq!(cond.select(&rows)?.labels.unwrap().to_vec1::<u32>()?, vec![4, 3]);
/// assert_eq!(cond.repeat(2)?.labels.unwrap().to_vec1::<u32>()?, vec![3, 3, 1, 1, 4, 4]);
/// assert!(Cond::none().is_none());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Cond {
    /// Class or action labels, `[B]` (u32).
    pub labels: Option<Tensor>,
    /// A per-row context tensor, `[B, ...]`.
    pub context: Option<Tensor>,
    /// A per-row mask, `[B, ...]` (1 = present).
    pub mask: Option<Tensor>,
}

/// The empty condition, for code that has a reference to pass and nothing to say.
pub static NO_COND: Cond = Cond {
    labels: None,
    context: None,
    mask: None,
};

impl Cond {
    /// No condition: what every unconditioned call passes.
    pub fn none() -> Self {
        Self::default()
    }

    /// Class labels `[B]`, stored as u32.
    pub fn labels(labels: Tensor) -> Self {
        Self {
            labels: Some(labels),
            ..Self::default()
        }
    }

    /// A context tensor `[B, ...]`.
    pub fn context(context: Tensor) -> Self {
        Self {
            context: Some(context),
            ..Self::default()
        }
    }

    /// The same with a mask `[B, ...]`.
    pub fn with_mask(mut self, mask: Tensor) -> Self {
        self.mask = Some(mask);
        self
    }

    pub fn is_none(&self) -> bool {
        self.labels.is_none() && self.context.is_none() && self.mask.is_none()
    }

    fn fields(&self) -> [(&'static str, Option<&Tensor>); 3] {
        [
            ("labels", self.labels.as_ref()),
            ("context", self.context.as_ref()),
            ("mask", self.mask.as_ref()),
        ]
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let g = |t: &Option<Tensor>| t.as_ref().map(&f).transpose();
        Ok(Self {
            labels: g(&self.labels)?,
            context: g(&self.context)?,
            mask: g(&self.mask)?,
        })
    }

    /// Checks that every present field has `batch` rows (labels: exactly `[batch]`),
    /// with an error naming the field and both shapes.
    pub fn check(&self, batch: usize) -> Result<()> {
        for (name, t) in self.fields() {
            let Some(t) = t else { continue };
            let ok = match name {
                "labels" => t.dims() == [batch],
                _ => t.rank() >= 1 && t.dim(0)? == batch,
            };
            if !ok {
                bail!(
                    "condition `{name}` has shape {:?}, expected {} rows for a batch of {batch}",
                    t.dims(),
                    if name == "labels" {
                        "[batch]"
                    } else {
                        "[batch, ...]"
                    }
                );
            }
        }
        Ok(())
    }

    /// Rows `rows` (`[n]`, u32) of every field, in that order.
    pub fn select(&self, rows: &Tensor) -> Result<Self> {
        self.map(|t| t.index_select(rows, 0))
    }

    /// Rows `start .. start + len` of every field.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// Each row `n` times in a row (n draws per condition): row i becomes rows
    /// i·n .. (i+1)·n.
    pub fn repeat(&self, n: usize) -> Result<Self> {
        self.map(|t| {
            let b = t.dim(0)?;
            let idx: Vec<u32> = (0..b as u32)
                .flat_map(|i| std::iter::repeat_n(i, n))
                .collect();
            t.index_select(&Tensor::from_vec(idx, b * n, t.device())?, 0)
        })
    }

    /// The rows of several conditions one after another (all must have the same fields).
    pub fn cat(parts: &[Cond]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Ok(Self::none());
        };
        let join = |get: fn(&Cond) -> &Option<Tensor>, name: &str| -> Result<Option<Tensor>> {
            if get(first).is_none() {
                if parts.iter().any(|p| get(p).is_some()) {
                    bail!("conditions to join differ in whether they have `{name}`");
                }
                return Ok(None);
            }
            let ts = parts
                .iter()
                .map(|p| match get(p) {
                    Some(t) => Ok(t),
                    None => bail!("conditions to join differ in whether they have `{name}`"),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&ts, 0)?))
        };
        Ok(Self {
            labels: join(|c| &c.labels, "labels")?,
            context: join(|c| &c.context, "context")?,
            mask: join(|c| &c.mask, "mask")?,
        })
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.map(|t| t.to_device(device))
    }

    /// The context as `dtype` (floating-point fields follow x's dtype in a model).
    pub fn context_as(&self, dtype: DType, who: &str) -> Result<Tensor> {
        match &self.context {
            Some(c) => c.to_dtype(dtype),
            None => bail!("{who} needs a context tensor in its condition, got none"),
        }
    }

    /// The labels, or an error naming the model that needs them.
    pub fn require_labels(&self, who: &str) -> Result<&Tensor> {
        match &self.labels {
            Some(l) => Ok(l),
            None => bail!("{who} needs class labels in its condition, got none"),
        }
    }
}

/// The indices of the nonzero entries of a 0/1 vector `[B]`, as a u32 tensor (`None`
/// when there are none): the rows a gate keeps.
pub fn nonzero_rows(mask: &Tensor) -> Result<Option<Tensor>> {
    let keep: Vec<u32> = mask
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?
        .iter()
        .enumerate()
        .filter(|(_, k)| **k != 0)
        .map(|(i, _)| i as u32)
        .collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let n = keep.len();
    Ok(Some(Tensor::from_vec(keep, n, mask.device())?))
}
