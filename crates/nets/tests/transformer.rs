//! The traffic-scene transformer: every parameter (map encoder included) gets a
//! gradient; permuting the agents permutes the output; the input gradient that guidance
//! uses agrees with finite differences; bad shapes are refused.

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use scoreguide_guidance::{Cond, Score};
use scoreguide_nets::{
    MapProbe, NoiseNet, ParamStore, Precond, SceneTransformer, SceneTransformerConfig, ScoreNet,
    SinusoidalEmbedding,
};
use scoreguide_sde::{randn, Process};

const B: usize = 3;

/// A map probe whose 3 × 3 grids land inside the 32-cell maps for inputs of order 1.
const PROBE: MapProbe = MapProbe {
    scale: [3.0, 3.0],
    offset: [15.5, 15.5],
    side: 3,
    spacing: 1.0,
};

fn setup(
    out_per_agent: usize,
    dtype: DType,
) -> (ParamStore, SceneTransformer, Tensor, Tensor, Tensor) {
    setup_with(SceneTransformerConfig::traffic(out_per_agent), dtype)
}

/// The traffic network without and with a map probe and a position embedding, and one
/// taking 4-layer maps at 64 cells (pooled to 32 for its tokens) read by a probe at 64.
fn both_kinds(out_per_agent: usize) -> [SceneTransformerConfig; 3] {
    let plain = SceneTransformerConfig::traffic(out_per_agent);
    [
        plain,
        SceneTransformerConfig {
            map_probe: Some(PROBE),
            position_embedding: Some(SinusoidalEmbedding {
                dim: 16,
                max_freq: 100.0,
            }),
            ..plain
        },
        SceneTransformerConfig {
            map_channels: 4,
            map_input_cells: Some(64),
            map_probe: Some(MapProbe {
                scale: [6.0, 6.0],
                offset: [31.5, 31.5],
                ..PROBE
            }),
            ..plain
        },
    ]
}

fn setup_with(
    cfg: SceneTransformerConfig,
    dtype: DType,
) -> (ParamStore, SceneTransformer, Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let store = ParamStore::new(11);
    let net = SceneTransformer::new(cfg, store.var_builder(dtype, &dev)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let x = randn(&mut rng, &[B, 12 * 7], &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let side = cfg.map_input_side();
    let maps = randn(&mut rng, &[B, cfg.map_channels, side, side], &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let c_noise = Tensor::new(&[-1.0f32, 0.0, 0.8], &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (store, net, x, maps, c_noise)
}

#[test]
fn every_parameter_gets_a_gradient() {
    for cfg in [7, 1].into_iter().flat_map(both_kinds) {
        let out = cfg.out_per_agent;
        let (store, net, x, maps, c) = setup_with(cfg, DType::F32);
        let tokens = net.encode_maps(&maps).unwrap();
        let y = net.forward_maps(&x, &c, &tokens).unwrap();
        assert_eq!(y.dims(), &[B, 12 * out]);
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        scoreguide_testing::assert_all_nonzero(&store.vars(), &grads, "scene transformer");
        if out == 7 && cfg.map_probe.is_none() {
            eprintln!(
                "scene transformer (score head): {} parameters",
                store.num_params()
            );
            assert!(store.num_params() > 100_000);
        }
    }
}

#[test]
fn permuting_agents_permutes_the_output() {
    for cfg in both_kinds(7) {
        permutation_check(cfg);
    }
}

fn permutation_check(cfg: SceneTransformerConfig) {
    let (_, net, x, maps, c) = setup_with(cfg, DType::F64);
    let tokens = net.encode_maps(&maps).unwrap();
    let perm: Vec<u32> = vec![5, 0, 11, 3, 7, 1, 10, 2, 9, 4, 8, 6];
    let idx = Tensor::new(perm.as_slice(), &Device::Cpu).unwrap();
    let permute = |t: &Tensor, f: usize| {
        t.reshape((B, 12, f))
            .unwrap()
            .index_select(&idx, 1)
            .unwrap()
            .reshape((B, 12 * f))
            .unwrap()
    };
    let y = net.forward_maps(&x, &c, &tokens).unwrap();
    let y_perm = net.forward_maps(&permute(&x, 7), &c, &tokens).unwrap();
    let d = scoreguide_testing::max_abs_diff(&y_perm, &permute(&y, 7));
    assert!(d < 1e-10, "max difference {d}");
    // And the output is not trivially symmetric: moving one agent changes the others.
    let mut v = scoreguide_testing::flat_f64(&x);
    v[0] += 1.0;
    let moved = Tensor::from_vec(v, (B, 84), &Device::Cpu).unwrap();
    let y_moved = net.forward_maps(&moved, &c, &tokens).unwrap();
    let other = |t: &Tensor| t.narrow(1, 7, 77).unwrap();
    assert!(scoreguide_testing::max_abs_diff(&other(&y_moved), &other(&y)) > 1e-6);
}

#[test]
fn input_gradient_matches_finite_differences() {
    for cfg in both_kinds(1) {
        gradient_check(cfg);
    }
}

fn gradient_check(cfg: SceneTransformerConfig) {
    // The per-agent classifier head summed: what guidance differentiates. (With the map
    // probe the function is piecewise linear in the positions; a step of 1e-6 crosses a
    // cell boundary with probability ~1e-5 per probe point.)
    let (_, net, x, maps, c) = setup_with(cfg, DType::F64);
    let tokens = net.encode_maps(&maps).unwrap();
    let f = |x: &Tensor| -> f64 {
        net.forward_maps(x, &c, &tokens)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xv = Var::from_tensor(&x).unwrap();
    let g = net
        .forward_maps(xv.as_tensor(), &c, &tokens)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = scoreguide_testing::flat_f64(g.get(xv.as_tensor()).unwrap());
    let base = scoreguide_testing::flat_f64(&x);
    // Positions (which also feed the distances), a size and an orientation feature.
    for &k in &[0usize, 1, 7 * 4 + 1, 7 * 5 + 2, 7 * 11 + 5, 84 + 10] {
        let at = |h: f64| {
            let mut v = base.clone();
            v[k] += h;
            f(&Tensor::from_vec(v, (B, 84), &Device::Cpu).unwrap())
        };
        // Small steps: the distance embedding reaches frequency 100, so third derivatives
        // are of order 1e6 and a step of 1e-5 would leave a truncation error of ~1e-5.
        let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
        assert!(
            (fd - g[k]).abs() < 1e-6 * (1.0 + fd.abs()),
            "coordinate {k}: {fd} vs {}",
            g[k]
        );
    }
}

#[test]
fn maps_in_the_condition_make_a_score_model() {
    let (store, net, x, maps, _) = setup(7, DType::F32);
    let eps = Precond::Eps {
        process: Process::vp(0.1, 20.0),
    };
    let sigma = Tensor::new(&[0.1f32, 1.0, 10.0], &Device::Cpu).unwrap();
    let cond = Cond::context(maps.clone());
    let model = ScoreNet::new(net, eps.clone()).unwrap();
    let s = model.score_with(&x, &sigma, &cond).unwrap();
    assert_eq!(s.dims(), &[B, 84]);
    // Without maps the network says what it needs.
    let e = model.score(&x, &sigma).err().unwrap().to_string();
    assert!(e.contains("maps"), "{e}");
    // A frozen network keeps the last maps' encoding: the same maps give the same
    // score, other maps (a new tensor) are encoded anew, never served the old encoding.
    let cfg = *model.net().config();
    let frozen = ScoreNet::new(
        SceneTransformer::new(
            cfg,
            store.frozen_var_builder(DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap(),
        eps,
    )
    .unwrap();
    let again = frozen.score_with(&x, &sigma, &cond).unwrap();
    assert_eq!(scoreguide_testing::max_abs_diff(&again, &s), 0.0);
    let flipped = Cond::context(maps.flip(&[3]).unwrap());
    let other = frozen.score_with(&x, &sigma, &flipped).unwrap();
    let direct = model.score_with(&x, &sigma, &flipped).unwrap();
    assert_eq!(scoreguide_testing::max_abs_diff(&other, &direct), 0.0);
    assert!(scoreguide_testing::max_abs_diff(&other, &s) > 1e-6);
}

#[test]
fn bad_shapes_are_refused() {
    let (_, net, x, maps, c) = setup(7, DType::F32);
    let tokens = net.encode_maps(&maps).unwrap();
    let e = net
        .forward_maps(&x.narrow(1, 0, 80).unwrap(), &c, &tokens)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("12 agents × 7 features"), "{e}");
    let e = net
        .forward_maps(&x, &c, &tokens.narrow(0, 2).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("map tokens"), "{e}");
    let e = net
        .map_encoder()
        .forward(&maps.narrow(2, 0, 16).unwrap())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[M, 1, 32, 32]"), "{e}");
    // A network that takes 4-layer maps at 64 cells refuses road-only ones.
    let lanes = both_kinds(7)[2];
    let (_, lane_net, ..) = setup_with(lanes, DType::F32);
    let e = lane_net.encode_maps(&maps).err().unwrap().to_string();
    assert!(e.contains("[M, 4, 64, 64]"), "{e}");
    for bad in [
        SceneTransformerConfig {
            map_input_cells: Some(48),
            ..lanes
        },
        SceneTransformerConfig {
            map_channels: 0,
            ..lanes
        },
    ] {
        let e = SceneTransformer::new(
            bad,
            ParamStore::new(0).var_builder(DType::F32, &Device::Cpu),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("map input side"), "{e}");
    }
    let bad = SceneTransformerConfig {
        heads: 5,
        ..SceneTransformerConfig::traffic(7)
    };
    assert!(SceneTransformer::new(
        bad,
        ParamStore::new(0).var_builder(DType::F32, &Device::Cpu)
    )
    .is_err());
    assert_eq!(NoiseNet::out_dim(&net), 84);
}

/// The map encoding's precomputed cross-attention keys and values give the same output as
/// computing them in the forward pass, and keys and values of the wrong shape are refused.
#[test]
fn precomputed_keys_and_values_change_nothing() {
    let (_, net, x, maps, c_noise) = setup(7, DType::F32);
    let encoded = net.encode_maps(&maps).unwrap();
    assert_eq!(encoded.keys_values.len(), 2);
    let with = net.forward_maps(&x, &c_noise, &encoded).unwrap();
    let without = scoreguide_nets::SceneMaps {
        keys_values: Vec::new(),
        ..encoded.clone()
    };
    let without = net.forward_maps(&x, &c_noise, &without).unwrap();
    assert_eq!(scoreguide_testing::max_abs_diff(&with, &without), 0.0);
    let wrong = scoreguide_nets::SceneMaps {
        keys_values: vec![encoded.tokens.clone(); 2],
        ..encoded
    };
    let err = net.forward_maps(&x, &c_noise, &wrong).unwrap_err();
    assert!(err.to_string().contains("keys and values"), "{err}");
}
