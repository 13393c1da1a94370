//! Schedules, loss scaling, clipping, AdamW and the masked cross-entropy.

use candle_core::{DType, Device, Tensor, Var};
use pipeline_models::train::{
    clip_grad_norm, global_grad_norm, log_softmax, masked_cross_entropy, masked_cross_entropy_sum,
    AdamW, AdamWConfig, GradScaler, GradScalerConfig, LrSchedule, ScheduleKind,
};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn schedules_follow_the_hugging_face_formulas() {
    let mk = |kind| LrSchedule {
        kind,
        base_lr: 1e-3,
        warmup_steps: 10,
        total_steps: 110,
    };
    for kind in [
        ScheduleKind::Constant,
        ScheduleKind::Linear,
        ScheduleKind::Cosine,
    ] {
        let s = mk(kind);
        assert_eq!(s.lr_at(0), 0.0);
        assert!(close(s.lr_at(5), 5e-4, 1e-12));
        assert!(close(s.lr_at(10), 1e-3, 1e-12), "{kind:?} peak");
    }
    let c = mk(ScheduleKind::Constant);
    assert_eq!(c.lr_at(100), 1e-3);
    assert_eq!(c.lr_at(1000), 1e-3);
    let l = mk(ScheduleKind::Linear);
    assert!(close(l.lr_at(60), 5e-4, 1e-12));
    assert!(close(l.lr_at(85), 2.5e-4, 1e-12));
    assert_eq!(l.lr_at(110), 0.0);
    assert_eq!(l.lr_at(500), 0.0);
    let cos = mk(ScheduleKind::Cosine);
    assert!(close(cos.lr_at(60), 5e-4, 1e-12));
    // a quarter through the decay: 0.5 (1 + cos(π/4))
    assert!(close(
        cos.lr_at(35),
        1e-3 * 0.5 * (1.0 + (std::f64::consts::FRAC_PI_4).cos()),
        1e-12
    ));
    assert!(cos.lr_at(110).abs() < 1e-18);
    // No warmup: starts at the peak.
    let nw = LrSchedule {
        kind: ScheduleKind::Linear,
        base_lr: 2.0,
        warmup_steps: 0,
        total_steps: 4,
    };
    assert_eq!(
        [nw.lr_at(0), nw.lr_at(1), nw.lr_at(2), nw.lr_at(4)],
        [2.0, 1.5, 1.0, 0.0]
    );
}

#[test]
fn grad_scaler_grows_backs_off_and_flags_overflow() {
    let cfg = GradScalerConfig {
        growth_interval: 3,
        ..Default::default()
    };
    let mut s = GradScaler::new(cfg);
    assert_eq!(s.scale(), 65536.0);
    for _ in 0..2 {
        s.update(false);
    }
    assert_eq!(s.scale(), 65536.0);
    s.update(false);
    assert_eq!(s.scale(), 131072.0, "grows ×2 after 3 clean steps");
    assert_eq!(s.state().growth_tracker, 0);
    s.update(false);
    s.update(true);
    assert_eq!(s.scale(), 65536.0, "backs off ×0.5");
    assert_eq!(s.state().growth_tracker, 0, "overflow resets the streak");

    let dev = Device::Cpu;
    let mut clean = vec![Tensor::new(&[65536f32, -131072.0], &dev).unwrap()];
    assert!(!s.unscale(&mut clean, 2.0).unwrap());
    assert_eq!(
        clean[0].to_vec1::<f32>().unwrap(),
        vec![0.5, -1.0],
        "divides by scale × divisor"
    );
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let mut g = vec![
            Tensor::new(&[1f32], &dev).unwrap(),
            Tensor::new(&[0f32, bad], &dev).unwrap(),
        ];
        assert!(s.unscale(&mut g, 1.0).unwrap(), "{bad} detected");
    }
    // Huge but finite gradients are not overflow.
    let mut big = vec![Tensor::new(&[3e38f32, 3e38], &dev).unwrap()];
    assert!(!GradScaler::disabled().unscale(&mut big, 1.0).unwrap());
    let d = GradScaler::disabled();
    assert_eq!(d.scale(), 1.0);
}

#[test]
fn clipping_scales_to_the_global_norm() {
    let dev = Device::Cpu;
    let mut g = vec![
        Tensor::new(&[3f32], &dev).unwrap(),
        Tensor::new(&[[4f32]], &dev).unwrap(),
    ];
    assert!(close(global_grad_norm(&g).unwrap(), 5.0, 1e-12));
    let n = clip_grad_norm(&mut g, 1.0).unwrap();
    assert!(close(n, 5.0, 1e-12), "returns the norm before clipping");
    assert!(close(global_grad_norm(&g).unwrap(), 1.0, 1e-6));
    assert!(close(g[0].to_vec1::<f32>().unwrap()[0] as f64, 0.6, 1e-6));
    let mut small = vec![Tensor::new(&[0.3f32, 0.4], &dev).unwrap()];
    clip_grad_norm(&mut small, 1.0).unwrap();
    assert_eq!(
        small[0].to_vec1::<f32>().unwrap(),
        vec![0.3, 0.4],
        "under the limit: untouched"
    );
}

#[test]
fn adamw_matches_the_reference_update_and_round_trips_state() {
    let dev = Device::Cpu;
    let p = Var::new(&[1.0f32, -2.0], &dev).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
    let grads = [[0.5f64, -1.0], [0.25, 2.0]];
    // Reference in f64: torch.optim.AdamW.
    let (mut rp, mut m, mut v) = ([1.0f64, -2.0], [0f64; 2], [0f64; 2]);
    let lr = 0.01;
    for (t, g) in grads.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..2 {
            rp[i] *= 1.0 - lr * cfg.weight_decay;
            m[i] = 0.9 * m[i] + 0.1 * g[i];
            v[i] = 0.99 * v[i] + 0.01 * g[i] * g[i];
            let denom = (v[i] / (1.0 - 0.99f64.powi(t))).sqrt() + 1e-8;
            rp[i] -= lr / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
        }
        opt.step(
            &[Tensor::new(&[g[0] as f32, g[1] as f32], &dev).unwrap()],
            lr,
        )
        .unwrap();
    }
    let got = p.as_tensor().to_vec1::<f32>().unwrap();
    // torch.optim.AdamW in f64 on the same inputs gives exactly the reference above.
    let torch_result = [0.978_676_520_418_576_8, -1.989_668_077_210_160_5];
    for i in 0..2 {
        assert!(close(rp[i], torch_result[i], 1e-12));
    }
    for i in 0..2 {
        assert!(close(got[i] as f64, rp[i], 1e-6), "{} vs {}", got[i], rp[i]);
    }
    // State round trip: a copy continues identically.
    let q = Var::from_tensor(p.as_tensor()).unwrap();
    let mut opt2 = AdamW::new(vec![("p".into(), q.clone())], cfg).unwrap();
    opt2.load_state(&opt.state_tensors(), opt.steps()).unwrap();
    let g = Tensor::new(&[0.1f32, 0.1], &dev).unwrap();
    opt.step(std::slice::from_ref(&g), lr).unwrap();
    opt2.step(&[g], lr).unwrap();
    assert_eq!(
        p.as_tensor().to_vec1::<f32>().unwrap(),
        q.as_tensor().to_vec1::<f32>().unwrap()
    );
    // Zero decay leaves a zero-gradient parameter alone.
    let z = Var::new(&[3.0f32], &dev).unwrap();
    let mut o = AdamW::new(vec![("z".into(), z.clone())], AdamWConfig::default()).unwrap();
    o.step(&[Tensor::new(&[0f32], &dev).unwrap()], 0.1).unwrap();
    assert_eq!(z.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
    // f16 master weights are refused.
    let h = Var::new(&[half::f16::ONE], &dev).unwrap();
    assert!(AdamW::new(vec![("h".into(), h)], cfg)
        .unwrap_err()
        .to_string()
        .contains("f32"));
}

#[test]
fn masked_cross_entropy_matches_a_direct_computation_and_shifts_by_one() {
    let dev = Device::Cpu;
    let (b, t, vsz) = (2, 4, 5);
    let vals: Vec<f32> = (0..b * t * vsz)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 4.0)
        .collect();
    let logits = Tensor::from_vec(vals.clone(), (b, t, vsz), &dev).unwrap();
    let targets = Tensor::new(&[[1u32, 4, 0, 2], [3, 3, 1, 0]], &dev).unwrap();
    let mask = Tensor::new(&[[1u8, 1, 0, 1], [0, 1, 1, 0]], &dev).unwrap();
    let (sum, n) = masked_cross_entropy_sum(&logits, &targets, &mask).unwrap();
    // Positions scored: (row, predicting index j from logits j-1) with mask[j] = 1, j ≥ 1.
    let tg = [[1usize, 4, 0, 2], [3, 3, 1, 0]];
    let mk = [[1, 1, 0, 1], [0, 1, 1, 0]];
    let (mut expect, mut count) = (0f64, 0);
    for r in 0..b {
        for j in 1..t {
            if mk[r][j] == 0 {
                continue;
            }
            let row: Vec<f64> = (0..vsz)
                .map(|k| vals[(r * t + j - 1) * vsz + k] as f64)
                .collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            expect += lse - row[tg[r][j]];
            count += 1;
        }
    }
    assert_eq!(n, count);
    assert!(close(sum.to_scalar::<f32>().unwrap() as f64, expect, 1e-5));
    let mean = masked_cross_entropy(&logits, &targets, &mask).unwrap();
    assert!(close(
        mean.to_scalar::<f32>().unwrap() as f64,
        expect / count as f64,
        1e-5
    ));
    // Backward is recorded: d mean / d logits = (softmax − onehot) / count on scored rows.
    let lv = Var::from_tensor(&logits).unwrap();
    let loss = masked_cross_entropy(lv.as_tensor(), &targets, &mask).unwrap();
    let g = loss
        .backward()
        .unwrap()
        .get(lv.as_tensor())
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    let sm = candle_nn::ops::softmax(&logits, 2)
        .unwrap()
        .to_vec3::<f32>()
        .unwrap();
    for r in 0..b {
        for j in 0..t {
            for k in 0..vsz {
                let scored = j + 1 < t && mk[r][j + 1] == 1;
                let want = if scored {
                    (sm[r][j][k] - if tg[r][j + 1] == k { 1.0 } else { 0.0 }) / count as f32
                } else {
                    0.0
                };
                assert!((g[r][j][k] - want).abs() < 1e-6, "grad[{r}][{j}][{k}]");
            }
        }
    }
    // bf16 logits are upcast; the empty mask is an error for the mean.
    let lb = logits.to_dtype(DType::BF16).unwrap();
    assert_eq!(
        masked_cross_entropy_sum(&lb, &targets, &mask)
            .unwrap()
            .0
            .dtype(),
        DType::F32
    );
    let none = mask.zeros_like().unwrap();
    assert!(masked_cross_entropy(&logits, &targets, &none).is_err());
    assert!(masked_cross_entropy(&logits, &targets.narrow(1, 0, 3).unwrap(), &mask).is_err());
    // log_softmax is stable for large logits.
    let big = Tensor::new(&[[1000f32, 0.0]], &dev).unwrap();
    let ls = log_softmax(&big).unwrap().to_vec2::<f32>().unwrap();
    assert!(ls[0][0].abs() < 1e-6 && (ls[0][1] + 1000.0).abs() < 1e-3);
}

#[test]
fn qlora_recipe_round_trips_through_json() {
    let c = pipeline_models::train::TrainConfig::qlora(1000);
    assert_eq!(c.schedule.warmup_steps, 30);
    assert_eq!(c.max_grad_norm, Some(0.3));
    let json = serde_json::to_string(&c).unwrap();
    assert!(
        json.contains("\"compute_dtype\":\"bf16\"") && json.contains("\"kind\":\"constant\""),
        "{json}"
    );
    let back: pipeline_models::train::TrainConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
}
