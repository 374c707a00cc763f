//! Every op on the test device (`SCOREGUIDE_TEST_DEVICE`, see `scoreguide_testing::device`)
//! against the same formula in f64 on the CPU: on the CPU this checks the fused kernels,
//! on a GPU candle's kernels through the fallback path.

use candle_core::{DType, Device, Tensor, Var};
use scoreguide_kernels::{
    add_silu, attention, dense, layer_norm, relative_attention, self_attention, silu, sinusoidal,
    softmax_last_dim, space_to_depth, Act,
};
use scoreguide_testing::{device, max_abs_diff};

fn filled(seed: u64, shape: &[usize], dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i as u64 + 1) * (seed + 7) * 2654435761 % 1000) as f32 / 250.0) - 2.0)
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn on_cpu_f64(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

#[test]
fn ops_and_their_gradients_on_the_test_device() {
    let dev = device();
    let x = Var::from_tensor(&filled(1, &[33, 20], &dev)).unwrap();
    let w = Var::from_tensor(&(filled(2, &[17, 20], &dev) * 0.2).unwrap()).unwrap();
    let b = Var::from_tensor(&filled(3, &[17], &dev)).unwrap();
    let y = dense(x.as_tensor(), w.as_tensor(), b.as_tensor(), Act::Silu).unwrap();
    let y = add_silu(&y, b.as_tensor()).unwrap();
    let y = layer_norm(&silu(&y).unwrap(), b.as_tensor(), b.as_tensor()).unwrap();
    let y = softmax_last_dim(&y).unwrap();
    let e = sinusoidal(&y.sum(1).unwrap(), &[1.0, 10.0]).unwrap();
    let loss = (y.sqr().unwrap().sum_all().unwrap() + e.sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();

    // The same on the CPU in f64 through candle's own ops (the fallback path).
    let (xc, wc, bc) = (
        Var::from_tensor(&on_cpu_f64(x.as_tensor())).unwrap(),
        Var::from_tensor(&on_cpu_f64(w.as_tensor())).unwrap(),
        Var::from_tensor(&on_cpu_f64(b.as_tensor())).unwrap(),
    );
    let yc = dense(xc.as_tensor(), wc.as_tensor(), bc.as_tensor(), Act::Silu).unwrap();
    let yc = add_silu(&yc, bc.as_tensor()).unwrap();
    let yc = layer_norm(&silu(&yc).unwrap(), bc.as_tensor(), bc.as_tensor()).unwrap();
    let yc = softmax_last_dim(&yc).unwrap();
    let ec = sinusoidal(&yc.sum(1).unwrap(), &[1.0, 10.0]).unwrap();
    let lc = (yc.sqr().unwrap().sum_all().unwrap() + ec.sum_all().unwrap()).unwrap();
    let gc = lc.backward().unwrap();

    assert!(max_abs_diff(&on_cpu_f64(&y), &yc) < 1e-4);
    for (v, vc) in [(&x, &xc), (&w, &wc), (&b, &bc)] {
        let (a, e) = (
            on_cpu_f64(g.get(v.as_tensor()).unwrap()),
            gc.get(vc.as_tensor()).unwrap().clone(),
        );
        let scale = 1.0 + scoreguide_testing::max_abs(&e);
        assert!(
            max_abs_diff(&a, &e) < 1e-3 * scale,
            "{}",
            max_abs_diff(&a, &e)
        );
    }
}

#[test]
fn attention_ops_and_their_gradients_on_the_test_device() {
    let dev = device();
    let (b, a, heads, d, t) = (3, 5, 2, 4, 6);
    let hid = heads * d;
    let var = |seed, shape: &[usize]| {
        Var::from_tensor(&(filled(seed, shape, &dev) * 0.5).unwrap()).unwrap()
    };
    let vars = [
        var(4, &[b, a, 3 * hid]),
        var(5, &[b, t, 2 * hid]),
        var(6, &[b, a, a, 3 * d]),
        var(7, &[b, 4, 6, 2]),
    ];
    let mut mask = vec![0f32; b * a];
    mask[a - 1] = -1e9; // the first scene's last agent is masked out as a key
    let mask = Tensor::from_vec(mask, (b, a), &dev).unwrap();
    let loss = |v: [&Tensor; 4], mask: &Tensor| -> Tensor {
        let [qkv, kv, rel, image] = v;
        let own = (self_attention(qkv, heads, Some(mask)).unwrap()
            + relative_attention(qkv, rel, heads).unwrap())
        .unwrap();
        let crossed = attention(&own, kv, heads, None).unwrap();
        let blocks = space_to_depth(image, 2).unwrap();
        (crossed.sqr().unwrap().sum_all().unwrap()
            + (blocks.sum(3).unwrap().sqr().unwrap().sum_all().unwrap() * 0.1).unwrap())
        .unwrap()
    };
    let l = loss(vars.each_ref().map(|v| v.as_tensor()), &mask);
    let g = l.backward().unwrap();

    // The same on the CPU in f64 through candle's own ops (the fallback path).
    let cpu = vars
        .each_ref()
        .map(|v| Var::from_tensor(&on_cpu_f64(v.as_tensor())).unwrap());
    let lc = loss(cpu.each_ref().map(|v| v.as_tensor()), &on_cpu_f64(&mask));
    let gc = lc.backward().unwrap();

    assert!(max_abs_diff(&on_cpu_f64(&l), &lc) < 1e-3 * (1.0 + scoreguide_testing::max_abs(&lc)));
    for (v, vc) in vars.iter().zip(&cpu) {
        let (x, e) = (
            on_cpu_f64(g.get(v.as_tensor()).unwrap()),
            gc.get(vc.as_tensor()).unwrap().clone(),
        );
        let scale = 1.0 + scoreguide_testing::max_abs(&e);
        assert!(
            max_abs_diff(&x, &e) < 1e-3 * scale,
            "{}",
            max_abs_diff(&x, &e)
        );
    }
}
