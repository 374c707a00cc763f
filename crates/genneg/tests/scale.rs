//! Gen-neG at scale: `sample_valid`'s batch sizing (a property test over acceptance
//! rates), sharded collections merging to the single process's bytes, and synthetic sets
//! drawn from a proposal by sequential importance sampling.

use candle_core::Device;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use scoreguide_data::GaussianMixture;
use scoreguide_genneg::{
    collect_from, collect_shard, merge_shards, sample_valid, valid_draws, ClassifierKind,
    CollectConfig, Draws, LabelledSet, Shard, ShardDraws, Source, Unconditioned, ValidConfig,
};
use scoreguide_guidance::Score;
use scoreguide_oracles::{Checkerboard, Oracle};
use scoreguide_samplers::Sampler;
use scoreguide_sde::{append_zero, derive_seed, log_linear};

/// Row i of a fixed sequence is valid with probability 1 − ε.
fn bernoulli(seed: u64, eps: f64) -> impl Fn(usize) -> bool {
    move |i| rand::rngs::StdRng::seed_from_u64(derive_seed(seed, i as u64)).random::<f64>() >= eps
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// All k rows returned are valid and distinct, and the rows drawn stay within
    /// 2·G_k + min_batch, G_k being where the k-th valid row sits in the sequence (its
    /// mean is the ideal k / (1 − ε)).
    #[test]
    fn valid_draws_return_k_valid_rows_within_the_bound(
        eps in 0.0f64..0.97,
        k in 1usize..3000,
        log_delta in -6.0f64..-1.0,
        min_batch in 1usize..64,
        seed in 0u64..1000,
    ) {
        let valid = bernoulli(seed, eps);
        let cfg = ValidConfig {
            min_batch,
            budget: usize::MAX,
            ..ValidConfig::new(k, 10f64.powf(log_delta))
        };
        let r = valid_draws(&cfg, &mut |first, n| Ok((first..first + n).map(&valid).collect())).unwrap();
        prop_assert_eq!(r.rows.len(), k);
        prop_assert!(r.rows.iter().all(|&i| valid(i)));
        prop_assert!(r.rows.windows(2).all(|w| w[0] < w[1]));
        let g_k = (0..).filter(|&i| valid(i)).nth(k - 1).unwrap() + 1;
        prop_assert!(r.drawn <= 2 * g_k + min_batch, "drew {} with G_k = {g_k}", r.drawn);
        prop_assert_eq!(r.drawn, r.sizes.iter().sum::<usize>());
    }
}

/// In the mean the draws come close to the ideal: k / (1 − ε) for k = 1000.
#[test]
fn valid_draws_cost_close_to_the_ideal() {
    for eps in [0.0, 0.01, 0.1, 0.5, 0.9] {
        let mut ratios = Vec::new();
        for seed in 0..20 {
            let valid = bernoulli(seed, eps);
            let r = valid_draws(&ValidConfig::new(1000, 1e-3), &mut |first, n| {
                Ok((first..first + n).map(&valid).collect())
            })
            .unwrap();
            ratios.push(r.drawn as f64 * (1.0 - eps) / 1000.0);
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        // Measured: 1.000, 1.002, 1.015, 1.021, 1.094.
        assert!(mean < 1.15, "ε = {eps}: {mean:.3}× the ideal ({ratios:?})");
    }
}

#[test]
fn valid_draws_stop_at_the_budget_with_a_clear_message() {
    let cfg = ValidConfig {
        budget: 5000,
        ..ValidConfig::new(100, 1e-3)
    };
    let e = valid_draws(&cfg, &mut |_, n| Ok(vec![false; n]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("5000 draws gave 0 valid"), "{e}");
    assert!(valid_draws(&ValidConfig::new(0, 0.1), &mut |_, n| Ok(vec![true; n])).is_err());
    assert!(valid_draws(&ValidConfig::new(5, 1.0), &mut |_, n| Ok(vec![true; n])).is_err());
}

/// A mixture inside one white square with tails over its edges.
fn inside(std: f64) -> GaussianMixture {
    GaussianMixture::new(vec![1.0], vec![vec![1.0, 1.0]], vec![vec![std, std]]).unwrap()
}

fn ancestral() -> (Sampler, Vec<f64>) {
    (
        Sampler::DdpmAncestral,
        append_zero(log_linear(25, 2e-3, 20.0).unwrap()),
    )
}

#[test]
fn sample_valid_returns_only_valid_rows() {
    let board = Checkerboard::default();
    let (sampler, sigmas) = ancestral();
    let cfg = ValidConfig {
        seed: 4,
        ..ValidConfig::new(500, 1e-3)
    };
    let s = sample_valid(
        &inside(0.5),
        &sampler,
        &sigmas,
        &Unconditioned(&board),
        &[2],
        &cfg,
        &Device::Cpu,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(s.x.dims(), [500, 2]);
    let rows = s.x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let verdicts = board.check_rows(&rows, 2).unwrap();
    assert!(verdicts.iter().all(|v| v.valid));
    assert!(s.report.acceptance() < 0.98, "{}", s.report.summary(500));
    assert!(s.report.drawn > 500 && s.report.overhead(500) < 1.5);
}

fn collect_cfg() -> CollectConfig {
    CollectConfig {
        per_class: Some(60),
        batch: 150,
        budget: 2000,
        min_negatives: 10,
        seed: 7,
    }
}

fn bytes(d: &Draws) -> Vec<u8> {
    d.to_checkpoint().unwrap().to_bytes().unwrap()
}

fn shards(source: Source, cfg: &CollectConfig, n: usize) -> Vec<ShardDraws> {
    let board = Checkerboard::default();
    let (sampler, sigmas) = ancestral();
    (0..n)
        .map(|i| {
            // Each shard through a file, as separate processes hand them over.
            let s = collect_shard(
                source,
                &sampler,
                &sigmas,
                &Unconditioned(&board),
                &[2],
                cfg,
                Shard { index: i, count: n },
                &Device::Cpu,
                &mut |_, _| {},
            )
            .unwrap();
            let c = scoreguide_train::Checkpoint::from_bytes(
                &s.to_checkpoint().unwrap().to_bytes().unwrap(),
            )
            .unwrap();
            ShardDraws::from_checkpoint(&c, &Device::Cpu).unwrap()
        })
        .collect()
}

#[test]
fn four_shards_merge_to_the_single_process_bytes() {
    let board = Checkerboard::default();
    let (sampler, sigmas) = ancestral();
    let (target, proposal) = (inside(0.45), inside(0.7));
    let cfg = collect_cfg();
    for source in [
        Source::Model(&proposal as &dyn Score),
        Source::Sis {
            target: &target,
            proposal: &proposal,
        },
    ] {
        let single = collect_from(
            source,
            &sampler,
            &sigmas,
            &Unconditioned(&board),
            &[2],
            &cfg,
            &Device::Cpu,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(single.drawn < cfg.budget, "{}", single.summary());
        let mut parts = shards(source, &cfg, 4);
        parts.reverse();
        let merged = merge_shards(&parts, &[2], &Device::Cpu).unwrap();
        assert_eq!(bytes(&merged), bytes(&single), "{}", single.summary());
        assert_eq!(single.sis.is_some(), matches!(source, Source::Sis { .. }));

        // A missing, repeated or foreign shard is refused by name.
        let e = merge_shards(&parts[1..], &[2], &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") || e.contains("3 of 4"), "{e}");
        let mut twice = parts.clone();
        twice[0] = parts[1].clone();
        let e = merge_shards(&twice, &[2], &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice") || e.contains("missing"), "{e}");
        let mut foreign = parts.clone();
        foreign[2].cfg.seed += 1;
        let e = merge_shards(&foreign, &[2], &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("drawn under"), "{e}");
    }
}

#[test]
fn shard_ranges_cover_every_batch_once() {
    for batches in [0, 1, 3, 4, 17, 100] {
        for count in 1..7 {
            let ranges: Vec<_> = (0..count)
                .map(|index| Shard { index, count }.batches(batches))
                .collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[count - 1].end, batches);
            assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
    assert_eq!(
        "2/4".parse::<Shard>().unwrap(),
        Shard { index: 2, count: 4 }
    );
    for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
        assert!(bad.parse::<Shard>().is_err(), "{bad}");
    }
}

/// Rows drawn from a wider proposal, weighted for the target, estimate the target's
/// valid rate (its own draws, counted) and give class weights with mean α and 1 − α.
#[test]
fn sis_draws_estimate_the_targets_valid_rate() {
    let board = Checkerboard::default();
    let (sampler, sigmas) = ancestral();
    let (target, proposal) = (inside(0.45), inside(0.7));
    let cfg = CollectConfig {
        per_class: None,
        batch: 2000,
        budget: 8000,
        min_negatives: 1,
        seed: 1,
    };
    let run = |source| {
        collect_from(
            source,
            &sampler,
            &sigmas,
            &Unconditioned(&board),
            &[2],
            &cfg,
            &Device::Cpu,
            &mut |_, _, _| {},
        )
        .unwrap()
    };
    let direct = run(Source::Model(&target));
    let plain_proposal = run(Source::Model(&proposal));
    let sis = run(Source::Sis {
        target: &target,
        proposal: &proposal,
    });
    let (a_t, a_q, a_sis) = (direct.alpha(), plain_proposal.alpha(), sis.alpha());
    let ess = sis.sis.as_ref().unwrap().ess;
    // Standard errors: √(α(1 − α)/n) ≈ 0.002 for the direct estimate; the weighted one
    // has n ≈ ESS.
    let se = (a_t * (1.0 - a_t) / ess).sqrt() + (a_t * (1.0 - a_t) / 8000.0).sqrt();
    assert!(a_q < a_t - 0.05, "proposal α {a_q}, target α {a_t}");
    assert!(
        (a_sis - a_t).abs() < 4.0 * se,
        "SIS α {a_sis} vs the target's {a_t} (se {se:.4}, ESS {ess:.0})"
    );
    assert_eq!(sis.valid_found, plain_proposal.valid_found);
    // Per class, the effective counts lie between 1 and the counts kept; the invalid
    // class, whose mass the target has mostly removed, is the degenerate one.
    let (ev, ei) = sis.class_ess().unwrap();
    let n = sis.balanced_count() as f64;
    assert!(
        ev > 1.0 && ev <= n + 1e-9 && ei > 1.0 && ei <= n + 1e-9,
        "{ev} {ei} of {n}"
    );
    assert!(ei < ev, "effective valid {ev}, invalid {ei}");
    assert!(direct.class_ess().is_none());

    let set = LabelledSet::new(&sis, ClassifierKind::IsBalanced).unwrap();
    let w = set.weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let l = set.labels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mean = |c: f32| {
        let v: Vec<f64> = w
            .iter()
            .zip(&l)
            .filter(|(w, l)| **l == c && **w > 0.0)
            .map(|(w, _)| *w as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!((mean(1.0) - a_sis).abs() < 1e-4, "{} vs {a_sis}", mean(1.0));
    assert!((mean(0.0) - (1.0 - a_sis)).abs() < 1e-4);
    let spread = w
        .iter()
        .filter(|&&w| w > 0.0)
        .fold((f32::MAX, 0f32), |(lo, hi), &w| (lo.min(w), hi.max(w)));
    assert!(
        spread.1 > 2.0 * spread.0,
        "importance weights left no spread: {spread:?}"
    );

    // The imbalanced set keeps every draw; weighted, its valid share is the target's α.
    let set = LabelledSet::new(&sis, ClassifierKind::Imbalanced).unwrap();
    let w = set.weights.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let l = set.labels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let total: f64 = w.iter().map(|&w| w as f64).sum();
    let share = w.iter().zip(&l).map(|(&w, &l)| (w * l) as f64).sum::<f64>() / total;
    assert!((share - a_sis).abs() < 1e-4, "{share} vs {a_sis}");
    assert!((total / w.len() as f64 - 1.0).abs() < 1e-4);
}
