use super::*;

/// (c) The commit kernel vs Policy::select on random confidences: exact ties (values on a
/// 1/16 grid), confidences exactly at τ, NaN, counts 1..1500 (more than one ranking tile).
#[test]
fn commit_matches_policy_select() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(14);
    let stride = 4096usize;
    let counts = [1usize, 2, 7, 19, 32, 99, 111, 1500, 3, 64];
    for policy in policies() {
        let n_seqs = 23;
        let mut seqs = Vec::new();
        let mut positions = Vec::new();
        let mut tokens = Vec::new();
        let mut conf = Vec::new();
        let mut want = Vec::new();
        let mut ranked_want = Vec::new();
        for si in 0..n_seqs {
            let n = counts[si % counts.len()];
            let mut pos: Vec<u32> = (0..stride as u32)
                .collect::<Vec<_>>()
                .choose_multiple(&mut rng, n)
                .cloned()
                .collect();
            pos.sort();
            let c: Vec<f32> = (0..n)
                .map(|j| match (si + j) % 5 {
                    0 => (rng.gen_range(0..17) as f32) / 16.0, // exact ties
                    1 => match policy {
                        Policy::Threshold { tau } | Policy::Confident { tau, .. } => tau,
                        _ => 0.75,
                    },
                    2 if j % 7 == 3 => f32::NAN,
                    _ => rng.gen_range(0.0f32..1.0),
                })
                .collect();
            let steps = policy.steps().unwrap_or(4).max(1);
            let step = rng.gen_range(0..steps + 1);
            let ctx = StepCtx {
                step,
                block_masked: n as u32 + rng.gen_range(0..20),
                masked: n as u32,
                block_len: n as u32 + 20,
            };
            let eligible: Vec<(u32, f32)> = pos.iter().cloned().zip(c.iter().cloned()).collect();
            let toks: Vec<u32> = (0..n).map(|_| rng.gen_range(0..152064)).collect();
            let sel = policy.select(ctx, &eligible);
            let tok_of = |p: u32| toks[pos.iter().position(|&q| q == p).unwrap()];
            want.push(sel.iter().map(|&p| (p, tok_of(p))).collect::<Vec<_>>());
            let mut ranked = eligible.clone();
            rank(&mut ranked);
            ranked_want.push(ranked.iter().map(|&(p, _)| (p, tok_of(p))).collect::<Vec<_>>());
            seqs.push(SeqCommitParams::new(commit_rule(&policy).unwrap(), count_ctx(ctx), positions.len(), n, n_seqs - 1 - si));
            positions.extend_from_slice(&pos);
            tokens.extend_from_slice(&toks);
            conf.extend_from_slice(&c);
        }
        let n_slots = positions.len();
        let mut ws = CommitWs::new(&gpu, n_seqs, n_slots).unwrap();
        ws.set_seqs(&gpu, &seqs, &positions, stride).unwrap();
        let dt = gpu.upload(&tokens, &[n_slots]).unwrap();
        let dc = gpu.upload(&conf, &[n_slots]).unwrap();
        let canvas0: Vec<u32> = (0..n_seqs * stride).map(|_| rng.gen_range(0..126464)).collect();
        let mut canvas = gpu.upload(&canvas0, &[n_seqs, stride]).unwrap();
        let out_len = ws.out_len();
        let mut out = gpu.upload(&vec![TOKEN_POISON; out_len], &[out_len]).unwrap();
        commit(&gpu, &mut ws, &dt, &dc, &mut canvas, &mut out).unwrap();
        let host = out.to_host(&gpu).unwrap();
        assert!(
            host.iter().all(|&x| x != TOKEN_POISON),
            "{policy}: part of the output was not written"
        );
        let lists = parse_commits(&host, &seqs).unwrap();
        let mut expect_canvas = canvas0.clone();
        for si in 0..n_seqs {
            let row = n_seqs - 1 - si;
            let got: Vec<(u32, u32)> = lists[si].iter().map(|c| (c.pos, c.token)).collect();
            assert_eq!(
                got, want[si],
                "{policy}: sequence {si} ({} slots) commits differ",
                seqs[si].slot_count
            );
            let base = n_seqs + 2 * seqs[si].slot_offset as usize;
            let full: Vec<(u32, u32)> = host[base..base + 2 * seqs[si].slot_count as usize]
                .chunks(2)
                .map(|c| (c[0], c[1]))
                .collect();
            assert_eq!(
                full, ranked_want[si],
                "{policy}: sequence {si}: full rank order differs"
            );
            for &(p, t) in &want[si] {
                expect_canvas[row * stride + p as usize] = t;
            }
        }
        let got_canvas = canvas.to_host(&gpu).unwrap();
        let diff = (0..got_canvas.len())
            .filter(|&i| got_canvas[i] != expect_canvas[i])
            .count();
        assert_eq!(
            diff, 0,
            "{policy}: {diff} canvas entries differ (committed slots written, others untouched)"
        );
        eprintln!("commit {policy}: {n_seqs} sequences, {n_slots} slots ok");
    }
}
