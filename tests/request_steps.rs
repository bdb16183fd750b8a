//! The engine refuses a request whose step-count policy asks for more steps than a block has
//! masked slots (each step commits at least one slot, so such a block would silently run
//! fewer steps), naming the count and the fix; the same check `demask generate` runs.
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::prior::Prior;
use demask::engine::{Engine, EngineOptions, Request};

fn engine() -> Engine {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    Engine::from_weights(random_weights(&cfg, 5), None, EngineOptions::default()).unwrap()
}

fn request(policy: &str) -> Request {
    Request::ids(vec![1, 2, 3]).gen_len(32).block_len(16).policy(policy.parse().unwrap())
}

#[test]
fn more_steps_than_masked_slots_is_refused_with_the_count_and_the_fix() {
    let mut e = engine();
    for (policy, fix) in [("schedule:100", "schedule:16"), ("random:17", "random:16")] {
        let msg = e.submit(request(policy)).unwrap_err().to_string();
        for needle in [policy, "16 masked slots", fix, "block_len"] {
            assert!(msg.contains(needle), "{policy}: {needle:?} missing from: {msg}");
        }
        assert_eq!(e.pending(), 0, "a refused request is not queued");
    }
    // A prior that fixes two slots of block 1 leaves it 14 masked slots.
    let mut r = request("schedule:16");
    r.prior = Some(Prior::Fixed(vec![(16, 7), (20, 8)]));
    let msg = e.generate(&[r]).unwrap_err().to_string();
    assert!(msg.contains("block 1 has only 14 masked slots") && msg.contains("schedule:14"), "{msg}");
}

#[test]
fn steps_up_to_the_masked_slots_run_exactly_that_many_steps() {
    let mut e = engine();
    let out = e.generate(&[request("schedule:16").stop_at_eos(false)]).unwrap().remove(0);
    assert_eq!(out.steps, 32, "16 steps in each of the two blocks");
    // Policies without a step count are not affected.
    e.generate(&[request("threshold:0.9")]).unwrap();
}
