//! Image score training: an interrupted run resumed from its saved state ends on the
//! same weights as an uninterrupted one (to the bit, dropout and flips included); the
//! sampler and the grid writer on the result; a data set that does not fit the network
//! is a named error.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use scoreguide_data::ImageSet;
use scoreguide_experiments::config::Preset;
use scoreguide_experiments::images::{
    load_image_score, sample_images, save_image_grid, train_image_score, ImageScoreConfig,
};
use scoreguide_nets::UNetConfig;
use scoreguide_train::{Checkpoint, Progress, Staged};

fn tiny() -> ImageScoreConfig {
    ImageScoreConfig {
        unet: UNetConfig {
            size: 8,
            base_channels: 8,
            multipliers: vec![1, 2],
            blocks_per_level: 1,
            attention_resolutions: vec![4],
            dropout: 0.1,
            groups: 4,
            ..UNetConfig::small_grey()
        },
        batch: 4,
        iters: 6,
        warmup_steps: 2,
        flip: true,
        save_every: 3,
        sampler_steps: 3,
        samples: 4,
        ..ImageScoreConfig::quick()
    }
}

fn images() -> ImageSet {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let x = scoreguide_sde::randn(&mut rng, &[10, 64], &Device::Cpu)
        .unwrap()
        .tanh()
        .unwrap();
    ImageSet::new(x, (0..10).map(|i| i % 3).collect(), 1, 8, 3, "synthetic").unwrap()
}

#[test]
fn a_resumed_run_ends_where_an_uninterrupted_one_does() {
    let (cfg, set, dev) = (tiny(), images(), Device::Cpu);
    let straight = train_image_score(&cfg, &set, None, &dev, &mut Progress::hidden()).unwrap();
    // Stop after the first saved stage (3 steps), then continue from it.
    let mut saved = Vec::<Checkpoint>::new();
    let mut save = |c: &Checkpoint| {
        saved.push(c.clone());
        Ok(())
    };
    let first = ImageScoreConfig {
        iters: 3,
        ..cfg.clone()
    };
    train_image_score(
        &first,
        &set,
        Some(Staged {
            resume: None,
            save_every: 3,
            save: &mut save,
        }),
        &dev,
        &mut Progress::hidden(),
    )
    .unwrap();
    let partial = saved.pop().expect("a saved state");
    let mut ignore = |_: &Checkpoint| Ok(());
    let resumed = train_image_score(
        &cfg,
        &set,
        Some(Staged {
            resume: Some(&partial),
            save_every: 3,
            save: &mut ignore,
        }),
        &dev,
        &mut Progress::hidden(),
    )
    .unwrap();
    let (a, b) = (straight.section("ema"), resumed.section("ema"));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff = (t - &b[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name} differs after resuming");
    }

    // The trained model samples images in [−1, 1], and they make a grid.
    let model = load_image_score(&straight, &dev).unwrap();
    let x = sample_images(&cfg, &model, 4, 0, &dev, &mut Progress::hidden()).unwrap();
    assert_eq!(x.dims(), &[4, 64]);
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|p| p.is_finite() && (-1.0..=1.0).contains(p)));
    let png = std::env::temp_dir().join(format!("scoreguide-grid-{}.png", std::process::id()));
    save_image_grid(&png, &x, 1, 8, 2).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 0);
    let bad = Tensor::zeros((2, 10), candle_core::DType::F32, &dev).unwrap();
    assert!(save_image_grid(&png, &bad, 1, 8, 2).is_err());
}

#[test]
fn images_that_do_not_fit_the_network_are_refused() {
    let cfg = ImageScoreConfig {
        unet: UNetConfig {
            size: 16,
            ..tiny().unet
        },
        ..tiny()
    };
    let err = train_image_score(&cfg, &images(), None, &Device::Cpu, &mut Progress::hidden());
    let Err(e) = err else {
        panic!("a 1×8×8 set trained a 16×16 U-Net")
    };
    let msg = e.to_string();
    assert!(
        msg.contains("1×8×8 images, the U-Net takes 1×16×16"),
        "{msg}"
    );
}
