//! Table 2's metrics of a set of samples, their summary over sampling seeds, and the
//! table.

use super::{DlsmImagesConfig, Method};
use crate::image_metrics::{image_metrics, FeatureNetwork, Images};
use crate::images::{
    accuracy, load_image_classifier, train_image_classifier, ImageClassifierConfig,
};
use candle_core::{bail, DType, Device, Result, Tensor};
use scoreguide_data::ImageSet;
use scoreguide_train::Progress;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Table 2's row of one method for one sampling seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    pub seed: u64,
    pub images: usize,
    /// The network of FID, KID and P/R/D/C (the Inception, or the domain classifier when
    /// the Inception metrics are off).
    pub features: String,
    pub fid: f64,
    pub kid: f64,
    /// Inception Score under the real-data classifier (the wheel's Inception has no
    /// classification head).
    pub is: f64,
    /// The spread of IS over its splits (not over seeds: the summary's `is_std` is that).
    #[serde(alias = "is_std")]
    pub is_split_std: f64,
    pub precision: f64,
    pub recall: f64,
    pub density: f64,
    pub coverage: f64,
    pub cw_precision: f64,
    pub cw_recall: f64,
    pub cw_density: f64,
    pub cw_coverage: f64,
    /// Per class (label order): [precision, recall, density, coverage].
    pub per_class: Vec<[f64; 4]>,
    /// Accuracy on the real test set of a classifier trained on these samples.
    pub cas: f64,
    /// FID on the real-data classifier's penultimate features.
    pub fid_domain: f64,
    /// Σ x and Σ x² over the scored images: kept scores are reused only for the same
    /// samples.
    pub checksum: [f64; 2],
}

/// [`Scores::checksum`] of a set of images.
pub fn checksum(images: &Tensor) -> Result<[f64; 2]> {
    let x = images.to_dtype(DType::F64)?;
    Ok([
        x.sum_all()?.to_scalar::<f64>()?,
        x.sqr()?.sum_all()?.to_scalar::<f64>()?,
    ])
}

/// What the samples are scored against: the real test images, the real-data classifier
/// (domain features, IS) and the Inception network.
pub struct Evaluator {
    pub real: Images,
    /// CAS's test set: the whole real test split.
    pub test: ImageSet,
    pub domain: FeatureNetwork,
    pub inception: Option<FeatureNetwork>,
    /// Where the real images' Inception features are kept between runs.
    pub cache: Option<PathBuf>,
}

impl Evaluator {
    /// Table 2's row for `fake` (labelled samples). Trains CAS's classifier on them with
    /// `cfg.cas` and seed `seed`.
    pub fn score(
        &self,
        cfg: &DlsmImagesConfig,
        fake: &Images,
        seed: u64,
        device: &Device,
    ) -> Result<Scores> {
        let Some(labels) = fake.labels.clone() else {
            bail!("{}: samples without labels", fake.name);
        };
        let FeatureNetwork::Domain { classifier, .. } = &self.domain else {
            bail!("the domain feature network must be the real-data classifier");
        };
        let batch = 100;
        let domain = image_metrics(
            &self.real,
            fake,
            &self.domain,
            cfg.k,
            Some((classifier, "the real-data classifier")),
            batch,
            None,
        )?;
        let inception = match &self.inception {
            Some(net) => Some(image_metrics(
                &self.real,
                fake,
                net,
                cfg.k,
                None,
                batch,
                self.cache.as_deref(),
            )?),
            None => None,
        };
        let m = inception.as_ref().unwrap_or(&domain);
        let set = ImageSet::new(
            fake.rows.clone(),
            labels,
            fake.channels,
            fake.size,
            self.test.classes,
            &fake.name,
        )?;
        let cas_cfg = ImageClassifierConfig {
            seed,
            ..cfg.cas.clone()
        };
        let mut progress = Progress::new(
            &format!("CAS classifier on {}", fake.name),
            cas_cfg.iters as usize,
        );
        let c = train_image_classifier(&cas_cfg, &set, device, &mut progress)?;
        let cas = accuracy(&load_image_classifier(&c, device)?, &self.test, 500, device)?;
        let cw = |v: Option<f64>| v.unwrap_or(f64::NAN);
        Ok(Scores {
            seed,
            images: fake.len(),
            features: m.features.clone(),
            fid: m.fid,
            kid: m.kid,
            is: domain.is.unwrap_or(f64::NAN),
            is_split_std: domain.is_std.unwrap_or(f64::NAN),
            precision: m.precision,
            recall: m.recall,
            density: m.density,
            coverage: m.coverage,
            cw_precision: cw(m.cw_precision),
            cw_recall: cw(m.cw_recall),
            cw_density: cw(m.cw_density),
            cw_coverage: cw(m.cw_coverage),
            per_class: m
                .per_class
                .iter()
                .map(|p| [p.precision, p.recall, p.density, p.coverage])
                .collect(),
            cas,
            fid_domain: domain.fid,
            checksum: checksum(&fake.rows)?,
        })
    }
}

/// One method's rows over the sampling seeds, as the JSON report holds them: every
/// number of [`Scores`] as its mean over the seeds, beside `<name>_std` (the sample
/// standard deviation; 0 for one seed), and the rows themselves under `seeds`.
pub fn summarise(name: &str, scale: f64, rows: &[Scores]) -> Result<serde_json::Value> {
    use serde_json::{json, Map, Value};
    let values: Vec<Map<String, Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r) {
            Ok(Value::Object(m)) => Ok(m),
            _ => bail!("scores of {name}: not an object"),
        })
        .collect::<Result<_>>()?;
    let mut out = Map::new();
    out.insert("name".into(), json!(name));
    out.insert("scale".into(), json!(scale));
    if let Some(first) = values.first() {
        for (key, v) in first {
            if key == "seed" || !v.is_number() {
                continue;
            }
            let xs: Vec<f64> = values
                .iter()
                .filter_map(|m| m.get(key).and_then(Value::as_f64))
                .collect();
            let (mean, std) = mean_std(&xs);
            out.insert(key.clone(), json!(mean));
            out.insert(format!("{key}_std"), json!(std));
        }
        out.insert("features".into(), first["features"].clone());
    }
    out.insert(
        "seeds".into(),
        serde_json::to_value(rows).map_err(candle_core::Error::wrap)?,
    );
    Ok(Value::Object(out))
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n;
    let var = match xs.len() {
        1 => 0.0,
        _ => xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0),
    };
    (mean, var.sqrt())
}

/// The first `m` images of each class of `x`, which holds `per_class` images of each
/// class in class order (as [`super::Stages::samples`] returns them).
pub fn first_per_class(x: &Images, per_class: usize, m: usize) -> Result<Images> {
    if per_class == 0 || m > per_class || x.len() % per_class != 0 {
        bail!(
            "{}: cannot take {m} of {per_class} images per class from {} images",
            x.name,
            x.len()
        );
    }
    let classes = x.len() / per_class;
    let rows = (0..classes)
        .map(|c| x.rows.narrow(0, c * per_class, m))
        .collect::<Result<Vec<_>>>()?;
    Ok(Images {
        rows: Tensor::cat(&rows, 0)?,
        labels: Some(
            (0..classes as u32)
                .flat_map(|c| std::iter::repeat_n(c, m))
                .collect(),
        ),
        name: format!("{} (first {m} per class)", x.name),
        ..x.clone()
    })
}

/// Per class, the mean over seeds of [precision, recall, density, coverage].
pub fn mean_per_class(rows: &[Scores]) -> Vec<[f64; 4]> {
    let classes = rows.first().map_or(0, |r| r.per_class.len());
    (0..classes)
        .map(|c| {
            let mut v = [0.0; 4];
            for r in rows {
                for (k, x) in v.iter_mut().enumerate() {
                    *x += r.per_class[c][k] / rows.len() as f64;
                }
            }
            v
        })
        .collect()
}

/// For each class-wise metric, the number of classes where `ours` (mean over seeds) is
/// above `base`.
pub fn classes_above(
    base: &[Scores],
    ours: &[Scores],
) -> std::collections::BTreeMap<&'static str, usize> {
    let (b, o) = (mean_per_class(base), mean_per_class(ours));
    ["precision", "recall", "density", "coverage"]
        .into_iter()
        .enumerate()
        .map(|(k, metric)| {
            (
                metric,
                b.iter().zip(&o).filter(|(b, o)| o[k] > b[k]).count(),
            )
        })
        .collect()
}

/// Table 2 as markdown: a row per metric, a column per method, mean ± sample deviation
/// over the seeds.
pub fn table(
    rows: &std::collections::BTreeMap<Method, Vec<Scores>>,
    cfg: &DlsmImagesConfig,
) -> String {
    use std::fmt::Write;
    let fmt = |xs: Vec<f64>| {
        let (m, s) = mean_std(&xs);
        match xs.len() {
            1 => format!("{m:.3}"),
            _ => format!("{m:.3} ± {s:.3}"),
        }
    };
    let mut out = format!(
        "\n{:?}, {} samples per class and method, {} seed(s), {}\n",
        cfg.data(),
        cfg.n_per_class,
        cfg.seeds.len(),
        cfg.sampler.describe()
    );
    let names: Vec<&str> = rows.keys().map(|m| m.name()).collect();
    let _ = writeln!(out, "| metric | {} |", names.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(names.len()));
    type Get = fn(&Scores) -> f64;
    let metrics: [(&str, Get); 13] = [
        ("FID", |s| s.fid),
        ("IS", |s| s.is),
        ("precision", |s| s.precision),
        ("recall", |s| s.recall),
        ("density", |s| s.density),
        ("coverage", |s| s.coverage),
        ("CAS", |s| s.cas),
        ("(CW) precision", |s| s.cw_precision),
        ("(CW) recall", |s| s.cw_recall),
        ("(CW) density", |s| s.cw_density),
        ("(CW) coverage", |s| s.cw_coverage),
        ("FID (domain)", |s| s.fid_domain),
        ("KID", |s| s.kid),
    ];
    for (name, get) in metrics {
        let cells: Vec<String> = rows
            .values()
            .map(|r| fmt(r.iter().map(get).collect()))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    out
}
