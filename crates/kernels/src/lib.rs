//! Fused CPU kernels for scoreguide's networks, as candle custom ops with their own
//! backward passes: a dense layer `act(x Wᵀ + b)` is one GEMM and one fused pass
//! forward, SiLU keeps its sigmoid for the backward pass, and the exponential is a
//! vectorised polynomial chosen per instruction set at run time. On other dtypes and
//! devices (CUDA) every function falls back to candle's own ops, so callers need no
//! second code path. Larger fusions: the whole residual MLP ([`res_mlp`]), multi-head
//! attention on packed rows ([`attention`], [`self_attention`]) and relative-position
//! attention from its definition ([`relative_attention`]), each one node (candle's
//! backward pass accumulates every node's gradient into a fresh zeroed buffer, so
//! fewer nodes is less memory traffic), block rearrangement between space and channels
//! ([`space_to_depth`], [`depth_to_space`]), batched products
//! of small strided matrices ([`batched_matmul`]), 2-D convolution as im2col + GEMM
//! whose backward passes are again convolution ops, so that it differentiates to any
//! order ([`conv2d`]), group norm with its SiLU ([`group_norm`]) and, for its
//! differentiable backward pass, per-channel scale and sum that do not reduce element by
//! element as candle does over leading axes; [`manual`] has the forward and
//! backward halves for hand-written input gradients. Adam and EMA updates are one pass
//! each ([`adam_update`], [`ema_update`]). [`threads`] holds the thread policy: one pool
//! (rayon's), and threads only for work large enough to gain from them.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use scoreguide_kernels::{dense, Act};
//!
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &dev)?)?;
//! let w = Tensor::new(&[[0.1f32, 0.2], [0.3, -0.4], [1.0, 0.0]], &dev)?;
//! let b = Tensor::new(&[0.0f32, 0.1, -0.1], &dev)?;
//! let y = dense(x.as_tensor(), &w, &b, Act::Silu)?;
//! let composed = candle_nn::ops::silu(&x.as_tensor().matmul(&w.t()?)?.broadcast_add(&b)?)?;
//! let diff = (&y - &composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-6);
//! let grads = y.sum_all()?.backward()?;
//! assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[2, 2]);
//! # Ok::<(), candle_core::Error>(())
//! ```

mod attention;
mod bmm;
mod channel;
mod conv;
mod gemm;
mod layout;
mod norm;
mod ops;
mod optim;
mod resmlp;
mod rpe;
mod simd;
pub mod threads;

pub use attention::{attention, self_attention};
pub use bmm::batched_matmul;
pub use conv::{conv2d, Conv2dSpec};
pub use layout::{depth_to_space, space_to_depth};
pub use norm::{group_norm, layer_norm, softmax_last_dim};
pub use ops::{add_silu, dense, manual, second_order, silu, silu_derivative, sinusoidal, Act};
pub use optim::{adam_update, ema_update, AdamStep};
pub use resmlp::{res_mlp, ResMlpShape};
pub use rpe::relative_attention;
