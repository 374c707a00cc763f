//! A base model with stacked classifiers, saved and loaded as one checkpoint.

use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_guidance::{Gated, Guided, LogProb};
use scoreguide_nets::{Classifier, ClassifierConfig, OnDenoised, ScoreModelConfig};
use scoreguide_train::Checkpoint;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// One guidance classifier of a stack.
#[derive(Debug, Clone)]
pub struct StackedClassifier {
    pub config: ClassifierConfig,
    pub weight: f64,
    /// `Some(σ_clean)` for a time-independent classifier guiding through x̂0.
    pub time_independent: Option<f64>,
    /// Guide only at σ ≤ this level ([`Gated`]): the term runs on those rows alone.
    pub gate: Option<f64>,
    pub tensors: BTreeMap<String, Tensor>,
}

impl StackedClassifier {
    /// A trained classifier ([`crate::train_classifier`]'s checkpoint) at weight 1.
    pub fn from_checkpoint(c: &Checkpoint) -> Result<Self> {
        let tensors = c.section("ema");
        if tensors.is_empty() {
            bail!("Gen-neG classifier checkpoint holds no `ema.*` tensors");
        }
        let time_independent: Option<f64> = match c.metadata.get("sigma_clean") {
            Some(_) => c.meta("sigma_clean")?,
            None => None,
        };
        Ok(Self {
            config: c.meta("classifier")?,
            weight: 1.0,
            time_independent,
            gate: None,
            tensors,
        })
    }

    /// The network on frozen weights in `dtype`.
    pub fn build(&self, dtype: DType, device: &Device) -> Result<Classifier> {
        self.config.build(&frozen_vb(&self.tensors, dtype, device))
    }

    /// The same classifier guiding at σ ≤ `gate` only (`None`: at every σ).
    pub fn gated(self, gate: Option<f64>) -> Self {
        Self { gate, ..self }
    }
}

#[derive(Serialize, Deserialize)]
struct StackedMeta {
    config: ClassifierConfig,
    weight: f64,
    time_independent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gate: Option<f64>,
}

/// Base score model plus classifiers: s_θ + Σ_k w_k ∇x log C_k.
#[derive(Debug, Clone)]
pub struct Stack {
    pub base_config: ScoreModelConfig,
    pub base: BTreeMap<String, Tensor>,
    pub classifiers: Vec<StackedClassifier>,
}

fn frozen_vb(
    t: &BTreeMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_nn::VarBuilder<'static> {
    let map: HashMap<String, Tensor> = t.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    candle_nn::VarBuilder::from_tensors(map, dtype, device)
}

impl Stack {
    pub fn new(base_config: ScoreModelConfig, base: BTreeMap<String, Tensor>) -> Self {
        Self {
            base_config,
            base,
            classifiers: Vec::new(),
        }
    }

    /// The same stack with `c` on top.
    pub fn with(&self, c: StackedClassifier) -> Self {
        let mut s = self.clone();
        s.classifiers.push(c);
        s
    }

    /// Parameters of the base and every classifier.
    pub fn params(&self) -> usize {
        let count =
            |t: &BTreeMap<String, Tensor>| t.values().map(|v| v.elem_count()).sum::<usize>();
        count(&self.base)
            + self
                .classifiers
                .iter()
                .map(|c| count(&c.tensors))
                .sum::<usize>()
    }

    /// The first `k` classifiers only (Gen-neG iteration k).
    pub fn truncated(&self, k: usize) -> Self {
        Self {
            classifiers: self.classifiers[..k.min(self.classifiers.len())].to_vec(),
            ..self.clone()
        }
    }

    /// Every classifier's weight times `gamma` ∈ [0, 1] (the base alone at 0): a
    /// proposal for sequential importance sampling that keeps more invalid mass than
    /// the stack, where the stack still puts it.
    pub fn tempered(&self, gamma: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&gamma) {
            candle_core::bail!(
                "tempered stack: the guidance fraction must lie in [0, 1], got {gamma}"
            );
        }
        let mut t = self.clone();
        if gamma == 0.0 {
            t.classifiers.clear();
        }
        for c in &mut t.classifiers {
            c.weight *= gamma;
        }
        Ok(t)
    }

    /// The guided model on frozen f32 weights: sampling computes no weight gradient.
    pub fn guided(&self, device: &Device) -> Result<Guided<'static>> {
        self.guided_as(DType::F32, device)
    }

    /// [`Stack::guided`] with weights in `dtype` (f64 for likelihoods).
    pub fn guided_as(&self, dtype: DType, device: &Device) -> Result<Guided<'static>> {
        let base = self
            .base_config
            .build(&frozen_vb(&self.base, dtype, device))?;
        let mut g = Guided::new(base);
        for (k, c) in self.classifiers.iter().enumerate() {
            let clf = c
                .build(dtype, device)
                .map_err(|e| candle_core::Error::msg(format!("stack classifier {k}: {e}")))?;
            let term: Box<dyn LogProb> = match c.time_independent {
                None => Box::new(clf),
                Some(sigma_clean) => Box::new(OnDenoised {
                    base: self
                        .base_config
                        .build(&frozen_vb(&self.base, dtype, device))?,
                    classifier: clf,
                    sigma_clean,
                }),
            };
            match c.gate {
                None => g.push(c.weight, term),
                Some(sigma_max) => g.push(c.weight, Gated::new(term, sigma_max)),
            }
        }
        Ok(g)
    }

    /// One checkpoint: `base.*`, `classifier.K.*`; metadata `model` (the base) and
    /// `classifiers` (configurations and weights).
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        let mut c = Checkpoint::new();
        c.set_meta("model", &self.base_config)?;
        c.insert_section("base", &self.base);
        let meta: Vec<StackedMeta> = self
            .classifiers
            .iter()
            .map(|s| StackedMeta {
                config: s.config.clone(),
                weight: s.weight,
                time_independent: s.time_independent,
                gate: s.gate,
            })
            .collect();
        c.set_meta("classifiers", &meta)?;
        for (k, s) in self.classifiers.iter().enumerate() {
            c.insert_section(&format!("classifier.{k}"), &s.tensors);
        }
        Ok(c)
    }

    pub fn from_checkpoint(c: &Checkpoint) -> Result<Self> {
        let base_config: ScoreModelConfig = c.meta("model")?;
        let base = c.section("base");
        if base.is_empty() {
            bail!("Gen-neG stack checkpoint holds no `base.*` tensors");
        }
        let metas: Vec<StackedMeta> = c.meta("classifiers")?;
        let mut classifiers = Vec::new();
        for (k, m) in metas.into_iter().enumerate() {
            let tensors = c.section(&format!("classifier.{k}"));
            if tensors.is_empty() {
                bail!("Gen-neG stack checkpoint lacks the tensors of classifier {k}");
            }
            classifiers.push(StackedClassifier {
                config: m.config,
                weight: m.weight,
                time_independent: m.time_independent,
                gate: m.gate,
                tensors,
            });
        }
        let stack = Self {
            base_config,
            base,
            classifiers,
        };
        // Build once on the CPU so a mismatched tensor is reported now, by name.
        stack.guided(&Device::Cpu)?;
        Ok(stack)
    }
}
