//! Bad input gets a clear error that names it, never a panic or a silent wrong answer;
//! checkpoints are written atomically.

use candle_core::{DType, Device, Tensor};
use scoreguide::checkerboard::{dsm_batch, BaselineConfig};
use scoreguide::data::{checkerboard, Dataset};
use scoreguide::guidance::Score;
use scoreguide::nets::{NetConfig, ParamStore, ResMlpConfig, ScoreModelConfig};
use scoreguide::samplers::{HeunOptions, Sampler};
use scoreguide::sde::SampleNoise;
use scoreguide::train::{load_score_model, Checkpoint, Progress, TrainConfig, Trainer, Weights};

fn err_of<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    format!("{}", r.expect_err("expected an error"))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sg-bad-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A checkpoint of `model` after one training step on `points` checkerboard points.
fn checkpoint_of(model: ScoreModelConfig, points: usize) -> Checkpoint {
    let cfg = BaselineConfig {
        model,
        train_points: points,
        ..BaselineConfig::default()
    };
    let data = Dataset::new(checkerboard(points, 0).unwrap(), "d").unwrap();
    let store = ParamStore::new(0);
    let model = cfg
        .model
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let mut t = Trainer::new(store, TrainConfig::default()).unwrap();
    t.run(1, &mut Progress::hidden(), |s, r| {
        dsm_batch(&model, &data, &cfg, s, r)
    })
    .unwrap();
    let mut ck = t.checkpoint().unwrap();
    ck.set_meta("model", &cfg.model).unwrap();
    ck
}

fn trained_checkpoint(hidden: usize) -> Checkpoint {
    let net = NetConfig::ResMlp(ResMlpConfig {
        hidden,
        ..Default::default()
    });
    checkpoint_of(
        ScoreModelConfig {
            net,
            ..ScoreModelConfig::checkerboard()
        },
        50,
    )
}

#[test]
fn datasets_with_nan_wrong_shape_or_no_rows_are_rejected_by_name() {
    let nan = Tensor::new(&[[0.0f32, 1.0], [f32::NAN, 2.0]], &Device::Cpu).unwrap();
    let e = err_of(Dataset::new(nan, "my data"));
    assert!(
        e.contains("my data") && e.contains("row 1") && e.contains("NaN"),
        "{e}"
    );
    let inf = Tensor::new(&[[f32::INFINITY, 1.0]], &Device::Cpu).unwrap();
    assert!(err_of(Dataset::new(inf, "x")).contains("infinite"));
    let flat = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
    assert!(err_of(Dataset::new(flat, "flat")).contains("[N, D]"));
    let empty = Tensor::zeros((0, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(err_of(Dataset::new(empty, "none")).contains("empty"));
}

#[test]
fn models_reject_wrong_shapes_and_bad_sigma() {
    let store = ParamStore::new(0);
    let model = ScoreModelConfig::checkerboard()
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let x3 = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let s = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    assert!(err_of(model.score(&x3, &s)).contains("[batch, 2]"));
    let x = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let s3 = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    assert!(err_of(model.score(&x, &s3)).contains("sigma"));
    let snan = Tensor::new(&[1.0f32, f32::NAN, 1.0, 1.0], &Device::Cpu).unwrap();
    assert!(err_of(model.score(&x, &snan)).contains("sigma"));
    // A score model whose output size differs from its input is refused at build time.
    let bad = ScoreModelConfig {
        net: NetConfig::ResMlp(ResMlpConfig {
            out_dim: 1,
            ..Default::default()
        }),
        ..ScoreModelConfig::checkerboard()
    };
    assert!(err_of(
        bad.build(&ParamStore::new(0).var_builder(DType::F32, &Device::Cpu))
            .map(|_| ())
    )
    .contains("output dimension"));
}

#[test]
fn samplers_reject_bad_grids_and_mismatched_noise() {
    let gm = scoreguide::data::GaussianMixture::new(vec![1.0], vec![vec![0.0]], vec![vec![1.0]])
        .unwrap();
    let x = Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap();
    let heun = Sampler::Heun(HeunOptions::default());
    let mut noise = SampleNoise::new(0, 0, 4);
    assert!(
        err_of(heun.sample(&gm, x.clone(), &[1.0, 2.0, 0.0], &mut noise, None))
            .contains("decreasing")
    );
    assert!(
        err_of(heun.sample(&gm, x.clone(), &[1.0, 0.0, 0.0], &mut noise, None))
            .contains("only the last")
    );
    assert!(
        err_of(heun.sample(&gm, x.clone(), &[f64::NAN, 0.0], &mut noise, None)).contains("finite")
    );
    let mut few = SampleNoise::new(0, 0, 3);
    assert!(err_of(heun.sample(&gm, x, &[1.0, 0.0], &mut few, None)).contains("noise generators"));
}

#[test]
fn training_stops_on_a_nan_loss_naming_the_step() {
    let store = ParamStore::new(0);
    let w = store
        .var_builder(DType::F32, &Device::Cpu)
        .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
        .unwrap();
    let mut t = Trainer::new(store, TrainConfig::default()).unwrap();
    let e = err_of(t.step(&(w.sum_all().unwrap() * f64::NAN).unwrap()));
    assert!(e.contains("step 0") && e.contains("NaN"), "{e}");
    assert!(
        err_of(Trainer::new(ParamStore::new(0), TrainConfig::default()).map(|_| ()))
            .contains("empty")
    );
    let bad = TrainConfig {
        lr: -1.0,
        ..TrainConfig::default()
    };
    let s = ParamStore::new(0);
    s.var_builder(DType::F32, &Device::Cpu)
        .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
        .unwrap();
    assert!(err_of(Trainer::new(s, bad).map(|_| ())).contains("learning rate"));
}

#[test]
fn truncated_foreign_and_incomplete_checkpoints_are_rejected() {
    let ck = trained_checkpoint(16);
    let bytes = ck.to_bytes().unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = err_of(Checkpoint::from_bytes(&bytes[..cut]));
        assert!(
            e.contains("truncated") || e.contains("corrupt"),
            "cut at {cut}: {e}"
        );
    }
    // A safetensors file that is not ours.
    let foreign = safetensors::serialize(
        [("w", Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())],
        None,
    )
    .unwrap();
    assert!(err_of(Checkpoint::from_bytes(&foreign)).contains("not a scoreguide checkpoint"));
    // A missing tensor is named.
    let mut missing = ck.clone();
    missing.tensors.remove("ema.output.bias");
    let e = err_of(load_score_model(&missing, Weights::Ema, DType::F32, &Device::Cpu).map(|_| ()));
    assert!(e.contains("output.bias") && e.contains("missing"), "{e}");
    // NaN weights are refused.
    let mut poisoned = ck.clone();
    poisoned.tensors.insert(
        "ema.output.bias".into(),
        Tensor::new(&[f32::NAN, 0.0], &Device::Cpu).unwrap(),
    );
    assert!(err_of(
        load_score_model(&poisoned, Weights::Ema, DType::F32, &Device::Cpu).map(|_| ())
    )
    .contains("NaN"));
}

#[test]
fn checkpoints_of_another_architecture_are_rejected() {
    // Weights of a hidden-16 model under metadata that says hidden 32.
    let mut ck = trained_checkpoint(16);
    let other = ScoreModelConfig {
        net: NetConfig::ResMlp(ResMlpConfig {
            hidden: 32,
            ..Default::default()
        }),
        ..ScoreModelConfig::checkerboard()
    };
    ck.set_meta("model", &other).unwrap();
    let e = err_of(load_score_model(&ck, Weights::Ema, DType::F32, &Device::Cpu).map(|_| ()));
    assert!(e.contains("shape"), "{e}");
    // Resuming a trainer whose model differs from the checkpoint's.
    let store = ParamStore::new(0);
    other
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let before: Vec<_> = store
        .tensors()
        .unwrap()
        .values()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let mut t = Trainer::new(store.clone(), TrainConfig::default()).unwrap();
    let e = err_of(t.restore(&trained_checkpoint(16)));
    assert!(e.contains("shape"), "{e}");
    let after: Vec<_> = store
        .tensors()
        .unwrap()
        .values()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    assert_eq!(before, after, "a failed restore changed the weights");
    assert_eq!(t.steps_done(), 0);
}

#[test]
fn a_failed_save_keeps_the_previous_checkpoint() {
    let dir = temp_dir("atomic");
    let path = dir.join("model.safetensors");
    let first = trained_checkpoint(16);
    first.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Make the temporary file impossible to create: a directory stands at its name.
    let tmp = dir.join(format!(".model.safetensors.{}.tmp", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let e = err_of(trained_checkpoint(32).save(&path));
    assert!(e.contains("model.safetensors"), "{e}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the previous checkpoint was damaged"
    );
    assert!(Checkpoint::load(&path).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn loading_a_missing_file_names_it() {
    let e = err_of(Checkpoint::load("/nonexistent/dir/ck.safetensors"));
    assert!(e.contains("/nonexistent/dir/ck.safetensors"), "{e}");
}

fn fuzz_seed_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/tiny.safetensors")
}

/// Regenerates the fuzzer's seed checkpoint (run by hand after a format change).
#[test]
#[ignore]
fn write_fuzz_seed() {
    let net = NetConfig::ResMlp(ResMlpConfig {
        hidden: 4,
        blocks: 1,
        embedding: scoreguide::nets::SinusoidalEmbedding {
            dim: 4,
            max_freq: 10.0,
        },
        ..Default::default()
    });
    let ck = checkpoint_of(
        ScoreModelConfig {
            net,
            ..ScoreModelConfig::checkerboard()
        },
        8,
    );
    ck.save(fuzz_seed_path()).unwrap();
}

#[test]
fn fuzz_seed_is_a_loadable_checkpoint() {
    let ck = Checkpoint::load(fuzz_seed_path()).unwrap();
    load_score_model(&ck, Weights::Ema, DType::F32, &Device::Cpu).unwrap();
}
