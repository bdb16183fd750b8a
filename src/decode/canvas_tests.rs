//! Tests of `decode::canvas` (both layouts, the stop rules, `edit:`).
use super::*;

fn cfg() -> ModelConfig {
    ModelConfig::preset("tiny-llada").unwrap()
}

fn spec(gen_len: u32, block_len: u32, stop_at_eos: bool) -> CanvasSpec {
    CanvasSpec { gen_len, block_len, stop_at_eos }
}

#[test]
fn blocks_advance_and_fixed_blocks_are_skipped() {
    let cfg = cfg();
    // gen 6, blocks of 2; block 0 fully fixed, block 1 half fixed.
    let prior = [Some(5), Some(6), Some(7), None, None, None];
    let mut c = Canvas::new(&[1, 2, 3], &prior, spec(6, 2, true), &cfg).unwrap();
    assert_eq!(c.block(), 1);
    assert_eq!(c.eligible(), [6]);
    assert_eq!(c.ctx(), StepCtx { step: 0, block_masked: 1, masked: 1, block_len: 2 });
    c.apply(&[Commit { pos: 6, token: 40 }], cfg.vocab).unwrap();
    assert_eq!(c.block(), 2);
    assert_eq!(c.eligible(), [7, 8]);
    c.apply(&[Commit { pos: 8, token: 41 }], cfg.vocab).unwrap();
    assert_eq!(c.ctx(), StepCtx { step: 1, block_masked: 2, masked: 1, block_len: 2 });
    let e = c.apply(&[Commit { pos: 8, token: 41 }], cfg.vocab).unwrap_err().to_string();
    assert!(e.contains("not an eligible slot"), "{e}");
    c.apply(&[Commit { pos: 7, token: 42 }], cfg.vocab).unwrap();
    assert!(c.is_done());
    assert_eq!(c.gen(), [5, 6, 7, 40, 42, 41]);
    assert_eq!(c.steps(), 3);
}

#[test]
fn eos_in_a_finished_block_fills_the_rest_but_keeps_fixed_slots() {
    let cfg = cfg();
    let prior = [None, None, None, Some(9), None, None];
    let mut c = Canvas::new(&[1], &prior, spec(6, 2, true), &cfg).unwrap();
    c.apply(&[Commit { pos: 1, token: cfg.eot_id }], cfg.vocab).unwrap();
    assert!(!c.is_done(), "the block still has a masked slot");
    c.apply(&[Commit { pos: 2, token: 3 }], cfg.vocab).unwrap();
    assert!(c.is_done() && c.stopped_at_eos());
    assert_eq!(c.gen(), [cfg.eot_id, 3, cfg.eos_id, 9, cfg.eos_id, cfg.eos_id]);
}

#[test]
fn bad_lengths_are_named() {
    let cfg = cfg();
    let err = |p: usize, g, b| Canvas::new(&vec![1; p], &[], spec(g, b, false), &cfg).unwrap_err().to_string();
    assert!(err(1, 0, 1).contains("gen_len must be > 0"));
    assert!(err(1, 4, 0).contains("block_len must be > 0"));
    let e = err(1, 10, 4);
    assert!(e.contains("10") && e.contains("4") && e.contains("multiple"), "{e}");
    assert!(err(1000, 32, 8).contains("exceeds the model's context"));
    let e = Canvas::new(&[512], &[], spec(4, 4, false), &cfg).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
}

fn llada2() -> ModelConfig {
    ModelConfig::preset("tiny-llada2").unwrap()
}

fn aligned(prompt_len: usize, gen_len: u32, stop: bool) -> Canvas {
    let cfg = llada2();
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| 1 + i % 300).collect();
    Canvas::with_layout(&prompt, &[], spec(gen_len, 32, stop), Layout::for_model(&cfg), &cfg).unwrap()
}

/// Commits every masked slot of the current block to `tok`.
fn fill_block(c: &mut Canvas, tok: u32, vocab: usize) {
    let commits: Vec<Commit> = c.eligible().iter().map(|&pos| Commit { pos, token: tok }).collect();
    c.apply(&commits, vocab).unwrap();
}

#[test]
fn aligned_blocks_sit_at_multiples_of_the_block_and_pad_the_canvas() {
    let cfg = llada2();
    assert_eq!(Layout::for_model(&cfg), Layout::Aligned);
    assert_eq!(Layout::for_model(&ModelConfig::preset("tiny-llada").unwrap()), Layout::Gen);
    // P = 45, G = 20: blocks [32, 64) (13 prompt slots fixed) and [64, 96) (1 output slot, 31 padding).
    let mut c = aligned(45, 20, false);
    assert_eq!((c.len(), c.blocks_start(), c.n_blocks(), c.block()), (96, 32, 2, 0));
    assert_eq!(c.block_bounds(), (32, 64));
    assert_eq!(c.eligible(), (45..64).collect::<Vec<u32>>(), "the prompt's tail is never eligible");
    assert_eq!(c.ctx(), StepCtx { step: 0, block_masked: 19, masked: 19, block_len: 32 });
    let e = c.apply(&[Commit { pos: 40, token: 3 }], cfg.vocab).unwrap_err().to_string();
    assert!(e.contains("not an eligible slot"), "{e}");
    fill_block(&mut c, 7, cfg.vocab);
    assert_eq!((c.block(), c.block_bounds(), c.eligible().len()), (1, (64, 96), 32), "padding slots decode too");
    assert_eq!(c.finished_gen(), 19);
    fill_block(&mut c, 8, cfg.vocab);
    assert!(c.is_done());
    assert_eq!(c.gen().len(), 20, "the output is x[P, P + G), never the padding");
    assert_eq!(c.output(), [vec![7; 19], vec![8]].concat());
    assert_eq!(c.block_of(64), 1);
    // P = 64: no prompt slot in the first decoded block; P = 1: block 0 holds it.
    let c = aligned(64, 32, false);
    assert_eq!((c.len(), c.blocks_start(), c.n_blocks(), c.eligible().len()), (96, 64, 1, 32));
    let c = aligned(1, 40, false);
    assert_eq!((c.len(), c.blocks_start(), c.n_blocks(), c.eligible().len()), (64, 0, 2, 31));
    // No divisibility needed, but the padded canvas must fit the context (1024).
    assert_eq!(cfg.max_seq_len, 1024);
    assert_eq!(Canvas::with_layout(&[1; 1000], &[], spec(20, 32, false), Layout::Aligned, &cfg).unwrap().len(), 1024);
    let e = Canvas::with_layout(&[1; 1000], &[], spec(30, 32, false), Layout::Aligned, &cfg).unwrap_err().to_string();
    assert!(e.contains("= 1030, padded to whole blocks of 32: 1056 exceeds the model's context of 1024"), "{e}");
}

#[test]
fn aligned_eos_stops_after_its_block_and_the_output_ends_at_the_first_eos() {
    let cfg = llada2();
    let vocab = cfg.vocab;
    // P = 17, G = 64: blocks [0, 32), [32, 64), [64, 96).
    let mut c = aligned(17, 64, true);
    // The end-of-turn id does not stop LLaDA2 (only eos_id does).
    let mut commits: Vec<Commit> = c.eligible().iter().map(|&pos| Commit { pos, token: 5 }).collect();
    commits[3].token = cfg.eot_id;
    c.apply(&commits, vocab).unwrap();
    if cfg.eot_id != cfg.eos_id {
        assert!(!c.is_done(), "EOT is not EOS for LLaDA2");
    }
    let mut commits: Vec<Commit> = c.eligible().iter().map(|&pos| Commit { pos, token: 6 }).collect();
    commits[10].token = cfg.eos_id; // position 42 = gen offset 25
    commits[20].token = cfg.eos_id;
    c.apply(&commits, vocab).unwrap();
    assert!(c.is_done() && c.stopped_at_eos());
    assert_eq!(c.output_len(), 26, "cut after the first EOS, which it keeps");
    assert_eq!(*c.output().last().unwrap(), cfg.eos_id);
    assert!(c.gen()[26..].iter().all(|&t| t != cfg.mask_id), "the rest is filled");
    // Stop off: the EOS is a token like any other; everything decodes, nothing is cut.
    let mut c = aligned(17, 64, false);
    fill_block(&mut c, cfg.eos_id, vocab);
    assert!(!c.is_done());
    fill_block(&mut c, 4, vocab);
    fill_block(&mut c, 4, vocab);
    assert!(c.is_done() && !c.stopped_at_eos());
    assert_eq!(c.output_len(), 64);
    // A prompt whose tail holds EOS does not stop: the official check starts at P.
    let mut prompt = vec![9u32; 20];
    prompt[19] = cfg.eos_id;
    let mut c = Canvas::with_layout(&prompt, &[], spec(40, 32, true), Layout::Aligned, &cfg).unwrap();
    fill_block(&mut c, 4, vocab);
    assert!(!c.is_done(), "EOS in the prompt's tail is not an output EOS");
}

#[test]
fn edit_rewrites_committed_slots_and_closes_blocks_on_a_quiet_step_or_the_budget() {
    let cfg = cfg();
    let vocab = cfg.vocab;
    let edit = |post| Policy::Edit { tau_m: 0.9, tau_e: 0.5, post };
    let mut c = Canvas::new(&[1, 2], &[], spec(8, 4, false), &cfg).unwrap();
    let p = edit(2);
    // Step 0: commit 2 and 3.
    c.apply_for(&[Commit { pos: 2, token: 10 }, Commit { pos: 3, token: 11 }], vocab, &p).unwrap();
    // Step 1: commit 4 and re-write 2 (an edit in a step that still has masks).
    c.apply_for(&[Commit { pos: 4, token: 12 }, Commit { pos: 2, token: 13 }], vocab, &p).unwrap();
    assert_eq!(&c.tokens()[2..5], [13, 11, 12]);
    // Not an edit: the same token, a prompt slot, a slot of another block, twice the same slot.
    for bad in [
        vec![Commit { pos: 5, token: 9 }, Commit { pos: 3, token: 11 }],
        vec![Commit { pos: 1, token: 9 }],
        vec![Commit { pos: 6, token: 9 }],
        vec![Commit { pos: 5, token: 9 }, Commit { pos: 5, token: 8 }],
    ] {
        assert!(c.clone().apply_for(&bad, vocab, &p).is_err(), "{bad:?}");
    }
    // Without an edit policy a committed slot is not eligible.
    assert!(c.clone().apply(&[Commit { pos: 5, token: 9 }, Commit { pos: 2, token: 9 }], vocab).is_err());
    // Step 2 fills the last mask: the block stays open for up to 2 post-mask steps.
    c.apply_for(&[Commit { pos: 5, token: 14 }], vocab, &p).unwrap();
    assert_eq!((c.block(), c.ctx().masked), (0, 0));
    let mut editable = Vec::new();
    c.editable_into(&mut editable);
    assert_eq!(editable, [2, 3, 4, 5]);
    // A post-mask step that edits, then one that changes nothing: the block ends.
    c.apply_for(&[Commit { pos: 3, token: 15 }], vocab, &p).unwrap();
    assert_eq!(c.block(), 0);
    let e = c.clone().apply(&[], vocab).unwrap_err().to_string();
    assert!(e.contains("committed no slot"), "{e}");
    c.apply_for(&[], vocab, &p).unwrap();
    assert_eq!((c.block(), c.steps()), (1, 5));
    // Block 1 with budget 2 spent by two editing post-mask steps: it ends without a quiet step.
    let all: Vec<Commit> = c.eligible().iter().map(|&pos| Commit { pos, token: 20 }).collect();
    c.apply_for(&all, vocab, &p).unwrap();
    c.apply_for(&[Commit { pos: 6, token: 21 }], vocab, &p).unwrap();
    assert_eq!(c.block(), 1);
    c.apply_for(&[Commit { pos: 6, token: 22 }], vocab, &p).unwrap();
    assert!(c.is_done());
    assert_eq!(c.steps(), 8);
    // Budget 0: a block ends with its last mask.
    let mut c = Canvas::new(&[1, 2], &[], spec(4, 4, false), &cfg).unwrap();
    let all: Vec<Commit> = c.eligible().iter().map(|&pos| Commit { pos, token: 20 }).collect();
    c.apply_for(&all, vocab, &edit(0)).unwrap();
    assert!(c.is_done());
    assert_eq!(c.max_steps(&edit(3)), 4 + 3);
}

#[test]
fn canvas_check_steps_counts_the_aligned_first_block() {
    // P = 45: the first decoded block has 19 masked slots; schedule:20 cannot run there.
    let c = aligned(45, 64, false);
    let e = c.check_steps(&Policy::Schedule { steps: 20 }).unwrap_err().to_string();
    assert!(e.contains("block 0 has only 19 masked slots") && e.contains("schedule:19"), "{e}");
    assert!(c.check_steps(&Policy::Schedule { steps: 19 }).is_ok());
    assert!(c.check_steps(&Policy::Threshold { tau: 0.9 }).is_ok());
}
