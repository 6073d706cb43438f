//! Time per token drawn by `lmkit_infer::sample` over a 49,152-token vocabulary (SmolLM2's), for
//! flat logits (uniform in [0, 8): the nucleus is most of the vocabulary) and peaked ones (a
//! few large values, as a trained model gives), with the default settings (temperature 0.8,
//! top_p 0.95) and with no cut (temperature 1).
//!
//!     cargo run --release -p lmkit-infer --example sample_time

use lmkit_infer::{sample, Rng, SamplingParams};

fn main() {
    let vocab = 49152;
    let mut state = 1u64;
    let mut uniform = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let flat: Vec<f32> = (0..vocab).map(|_| uniform() * 8.0).collect();
    let peaked: Vec<f32> = (0..vocab).map(|_| uniform().powi(30) * 30.0).collect();
    let uncut = SamplingParams {
        top_p: None,
        temperature: 1.0,
        ..Default::default()
    };
    for (name, logits) in [("flat", &flat), ("peaked", &peaked)] {
        for p in [SamplingParams::default(), uncut.clone()] {
            let mut rng = Rng::new(1);
            let draws = 500;
            let t = std::time::Instant::now();
            for _ in 0..draws {
                std::hint::black_box(sample(logits, &[], &p, &mut rng));
            }
            println!(
                "{name} logits, temperature {}, top_p {:?}: {:.3} ms per token",
                p.temperature,
                p.top_p,
                t.elapsed().as_secs_f64() * 1000.0 / draws as f64
            );
        }
    }
}
