//! Space-to-depth and back: the fused ops against candle's reshape and permutation, their
//! gradients, and each the other's inverse.

use candle_core::{DType, Device, Tensor, Var};
use proptest::prelude::*;
use scoreguide_kernels::{depth_to_space, space_to_depth};
use scoreguide_testing::max_abs_diff;

fn counting(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .reshape(shape)
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn matches_candles_ops_and_inverts(
        m in 1usize..3, rb in 1usize..4, cb in 1usize..4, ch in 1usize..4, block in 1usize..4
    ) {
        let x = counting(&[m, rb * block, cb * block, ch]);
        let y = space_to_depth(&x, block).unwrap();
        // The f64 path is candle's reshape and permutation.
        let y_ref = space_to_depth(&x.to_dtype(DType::F64).unwrap(), block)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        prop_assert_eq!(y.dims(), &[m, rb, cb, block * block * ch]);
        prop_assert!(max_abs_diff(&y, &y_ref) == 0.0);
        prop_assert!(max_abs_diff(&depth_to_space(&y, block).unwrap(), &x) == 0.0);
    }
}

#[test]
fn one_cell_holds_its_block_row_by_row() {
    // 1 image, 2 × 4 cells of 1 channel, blocks of 2: cell (0, 1) holds 2, 3, 6, 7.
    let x = counting(&[1, 2, 4, 1]);
    let y = space_to_depth(&x, 2).unwrap();
    let cell: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(&cell[4..8], &[2.0, 3.0, 6.0, 7.0]);
}

#[test]
fn gradients_are_the_inverse_rearrangement() {
    let x = Var::from_tensor(&counting(&[2, 4, 6, 3])).unwrap();
    let r = (counting(&[2, 2, 3, 12]) * 0.01).unwrap();
    let y = space_to_depth(x.as_tensor(), 2).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = g.get(x.as_tensor()).unwrap();
    assert!(max_abs_diff(g, &depth_to_space(&r, 2).unwrap()) == 0.0);
    assert_eq!(y.sorted_nodes().len(), 2, "one node and its input");
}

#[test]
fn bad_shapes_are_named_errors() {
    let err = space_to_depth(&counting(&[1, 3, 4, 1]), 2).unwrap_err();
    assert!(err.to_string().contains("space to depth"), "{err}");
    let err = depth_to_space(&counting(&[1, 2, 2, 6]), 2).unwrap_err();
    assert!(err.to_string().contains("depth to space"), "{err}");
}
