//! A parameter store with seeded initialisation.

use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use scoreguide_sde::derive_seed;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Named trainable parameters. Each one is initialised from a generator seeded by
/// (store seed, parameter name), so the same seed gives the same weights whatever the
/// order in which a model creates them.
#[derive(Clone)]
pub struct ParamStore {
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
    seed: u64,
    /// The only parameters a model may create here, with their shapes (what a
    /// checkpoint holds), when the store was made to rebuild one.
    expected: Option<Arc<BTreeMap<String, Vec<usize>>>>,
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms (std's hasher is not).
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn init_values(shape: &Shape, init: Init, rng: &mut StdRng) -> Vec<f32> {
    let n = shape.elem_count();
    let normal = |rng: &mut StdRng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                (mean + std * z) as f32
            })
            .collect()
    };
    let uniform = |rng: &mut StdRng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => normal(rng, mean, stdev),
        Init::Uniform { lo, up } => uniform(rng, lo, up),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
            };
            let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(rng, 0.0, std),
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(rng, -b, b)
                }
            }
        }
    }
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            vars: Arc::new(Mutex::new(BTreeMap::new())),
            seed,
            expected: None,
        }
    }

    /// A store in which a model may create only the parameters of `stored` (names and
    /// shapes, e.g. a checkpoint's tensors): the first other one fails, naming it, before
    /// anything is allocated for it — so a configuration read from a file cannot make
    /// the rebuild allocate more than the file implies. `what` names the source.
    pub fn expecting(seed: u64, stored: &BTreeMap<String, Tensor>) -> Self {
        let shapes = stored
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        Self {
            expected: Some(Arc::new(shapes)),
            ..Self::new(seed)
        }
    }

    /// A builder that creates (or reuses) parameters in this store.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// A builder over detached copies of the current values: a model built from it has
    /// no trainable parameter, so a backward pass through it computes only input
    /// gradients (what guidance and sampling need).
    pub fn frozen_var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let ts: HashMap<String, Tensor> = self.tensors()?.into_iter().collect();
        Ok(VarBuilder::from_tensors(ts, dtype, device))
    }

    /// The parameters, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let g = self.vars.lock().expect("parameter store lock poisoned");
        g.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Detached copies of the current values, sorted by name: a snapshot (a detached
    /// tensor alone would share the variable's storage and follow later updates).
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let g = self.vars.lock().expect("parameter store lock poisoned");
        g.iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    pub fn len(&self) -> usize {
        self.vars
            .lock()
            .expect("parameter store lock poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Overwrites every parameter with the tensor of the same name in `values`.
    /// Fails, naming the tensor, if one is missing, unknown to the model, has another
    /// shape, or holds a non-finite value; in that case no parameter is changed.
    pub fn assign(&self, values: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
        let g = self.vars.lock().expect("parameter store lock poisoned");
        if let Some(extra) = values.keys().find(|k| !g.contains_key(*k)) {
            bail!("{what}: tensor `{extra}` is not a parameter of this model (made for another architecture?)");
        }
        for (name, var) in g.iter() {
            let Some(t) = values.get(name) else {
                bail!("{what}: tensor `{name}` is missing");
            };
            if !matches!(t.dtype(), DType::F32 | DType::F64) {
                bail!(
                    "{what}: tensor `{name}` is stored as {:?}; weights must be f32 or f64 (they would be converted silently)",
                    t.dtype()
                );
            }
            if t.dims() != var.dims() {
                bail!(
                    "{what}: tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            let bad = t
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite());
            if bad {
                bail!("{what}: tensor `{name}` holds NaN or infinite values");
            }
        }
        for (name, var) in g.iter() {
            let t = &values[name];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

impl SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut g = self.vars.lock().expect("parameter store lock poisoned");
        if let Some(v) = g.get(name) {
            if v.shape() != &s {
                bail!(
                    "parameter `{name}` exists with shape {:?}, requested {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        if let Some(expected) = &self.expected {
            match expected.get(name) {
                None => bail!(
                    "the stored weights are missing `{name}` (shape {:?}), which the configuration asks for (another architecture?)",
                    s.dims()
                ),
                Some(dims) if dims[..] != *s.dims() => bail!(
                    "the configuration asks for parameter `{name}` of shape {:?}, the stored one has shape {dims:?}",
                    s.dims()
                ),
                Some(_) => {}
            }
        }
        let mut rng = StdRng::seed_from_u64(derive_seed(self.seed, name_hash(name)));
        let values = init_values(&s, h, &mut rng);
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        g.insert(name.to_string(), v);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let g = self.vars.lock().expect("parameter store lock poisoned");
        match g.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => bail!("parameter `{name}` not found in the store"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .lock()
            .expect("parameter store lock poisoned")
            .contains_key(name)
    }
}
