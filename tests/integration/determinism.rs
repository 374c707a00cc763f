//! Same seed → same bytes: initialisation, training, sampling, checkpoints and resume.

use candle_core::{DType, Device, Tensor};
use scoreguide::checkerboard::{dsm_batch, BaselineConfig};
use scoreguide::data::{checkerboard, Dataset};
use scoreguide::guidance::Cond;
use scoreguide::guidance::Score;
use scoreguide::nets::{
    NetConfig, ParamStore, ResMlpConfig, ScoreModelConfig, SinusoidalEmbedding,
};
use scoreguide::samplers::{sample_many, HeunOptions, Sampler};
use scoreguide::sde::{append_zero, log_linear};
use scoreguide::train::{load_score_model, Checkpoint, Progress, Trainer, Weights};

fn small_config() -> BaselineConfig {
    let mut cfg = BaselineConfig::default();
    cfg.model = ScoreModelConfig {
        net: NetConfig::ResMlp(ResMlpConfig {
            hidden: 32,
            embedding: SinusoidalEmbedding {
                dim: 16,
                max_freq: 100.0,
            },
            ..Default::default()
        }),
        ..cfg.model
    };
    cfg.train_points = 200;
    cfg.batch_size = 64; // minibatches, so batch order is part of what must resume exactly
    cfg.train.grad_clip = Some(1.0);
    cfg.train.warmup_steps = 5;
    cfg.train.seed = 9;
    cfg
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn setup(
    cfg: &BaselineConfig,
) -> (
    Dataset,
    ParamStore,
    scoreguide::nets::ScoreNet<scoreguide::nets::AnyNet>,
    Trainer,
) {
    let data = Dataset::new(checkerboard(cfg.train_points, 1).unwrap(), "train").unwrap();
    let store = ParamStore::new(cfg.train.seed);
    let model = cfg
        .model
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let trainer = Trainer::new(store.clone(), cfg.train.clone()).unwrap();
    (data, store, model, trainer)
}

#[test]
fn same_seed_same_initial_weights_and_different_seed_different() {
    let cfg = ScoreModelConfig::checkerboard();
    let w = |seed| {
        let s = ParamStore::new(seed);
        cfg.build(&s.var_builder(DType::F32, &Device::Cpu)).unwrap();
        s.tensors()
            .unwrap()
            .values()
            .flat_map(bits)
            .collect::<Vec<_>>()
    };
    assert_eq!(w(5), w(5));
    assert_ne!(w(5), w(6));
}

#[test]
fn resume_equals_no_interruption() {
    let cfg = small_config();
    let total = 12;
    // Uninterrupted.
    let (data, store, model, mut trainer) = setup(&cfg);
    let losses_full = trainer
        .run(total, &mut Progress::hidden(), |s, r| {
            dsm_batch(&model, &data, &cfg, s, r)
        })
        .unwrap();
    let final_full: Vec<Vec<u32>> = store.tensors().unwrap().values().map(bits).collect();
    let ema_full: Vec<Vec<u32>> = trainer.ema().shadow.values().map(bits).collect();

    // Interrupted halfway, through a checkpoint file, into a fresh process state.
    let dir = std::env::temp_dir().join(format!("sg-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("half.safetensors");
    let (data, _, model, mut trainer) = setup(&cfg);
    let mut losses = trainer
        .run(total / 2, &mut Progress::hidden(), |s, r| {
            dsm_batch(&model, &data, &cfg, s, r)
        })
        .unwrap();
    let mut ck = trainer.checkpoint().unwrap();
    ck.set_meta("model", &cfg.model).unwrap();
    ck.save(&path).unwrap();
    drop((model, trainer));

    let mut cfg2 = cfg.clone();
    cfg2.train.seed = 12345; // the checkpoint's own seed must win over a fresh store's
    let (data, store2, model, mut trainer) = setup(&cfg2);
    trainer.restore(&Checkpoint::load(&path).unwrap()).unwrap();
    assert_eq!(trainer.steps_done(), total / 2);
    losses.extend(
        trainer
            .run(total, &mut Progress::hidden(), |s, r| {
                dsm_batch(&model, &data, &cfg, s, r)
            })
            .unwrap(),
    );

    assert_eq!(
        losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        losses_full.iter().map(|l| l.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        store2
            .tensors()
            .unwrap()
            .values()
            .map(bits)
            .collect::<Vec<_>>(),
        final_full
    );
    assert_eq!(
        trainer.ema().shadow.values().map(bits).collect::<Vec<_>>(),
        ema_full
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn same_seed_same_samples_independent_of_batch_size() {
    let cfg = ScoreModelConfig::checkerboard();
    let store = ParamStore::new(3);
    let model = cfg
        .build(&store.var_builder(DType::F32, &Device::Cpu))
        .unwrap();
    let sigmas = append_zero(log_linear(8, 0.01, 20.0).unwrap());
    let sampler = Sampler::Heun(HeunOptions {
        churn: 10.0,
        ..Default::default()
    });
    let draw = |seed, batch| {
        sample_many(
            &sampler,
            &model,
            &Cond::none(),
            50,
            &[2],
            &sigmas,
            seed,
            batch,
            &Device::Cpu,
            &mut |_| {},
        )
        .unwrap()
    };
    let a = draw(1, 50);
    assert_eq!(bits(&a), bits(&draw(1, 50)));
    assert_ne!(bits(&a), bits(&draw(2, 50)));
    // Per-sample noise streams: batch size changes nothing but float summation order,
    // whose rounding grows with the values (and with the CPU's matmul kernel: AVX2 and
    // AVX-512 block the sums differently): 1e-4 of the largest value.
    let diff = scoreguide_testing::max_abs_diff(&a, &draw(1, 7));
    let scale = scoreguide_testing::max_abs(&a);
    assert!(
        diff < 1e-4 * scale.max(1.0),
        "batch size changed samples by {diff} (largest value {scale})"
    );
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs() {
    let cfg = small_config();
    let (data, _, model, mut trainer) = setup(&cfg);
    trainer
        .run(3, &mut Progress::hidden(), |s, r| {
            dsm_batch(&model, &data, &cfg, s, r)
        })
        .unwrap();
    let mut ck = trainer.checkpoint().unwrap();
    ck.set_meta("model", &cfg.model).unwrap();
    let dir = std::env::temp_dir().join(format!("sg-roundtrip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.safetensors");
    ck.save(&path).unwrap();
    let loaded = Checkpoint::load(&path).unwrap();
    let x = checkerboard(64, 2).unwrap();
    let sigma = Tensor::full(0.7f32, 64, &Device::Cpu).unwrap();
    for w in [Weights::Model, Weights::Ema] {
        let (a, _) = load_score_model(&ck, w, DType::F32, &Device::Cpu).unwrap();
        let (b, cfg_b) = load_score_model(&loaded, w, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cfg_b, cfg.model);
        assert_eq!(
            bits(&a.denoise(&x, &sigma).unwrap()),
            bits(&b.denoise(&x, &sigma).unwrap())
        );
    }
    // The trained (raw) weights equal the live model's.
    let (b, _) = load_score_model(&loaded, Weights::Model, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        bits(&model.denoise(&x, &sigma).unwrap()),
        bits(&b.denoise(&x, &sigma).unwrap())
    );
    std::fs::remove_dir_all(&dir).ok();
}
