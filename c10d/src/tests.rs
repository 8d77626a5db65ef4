use super::*;
use std::process::{Child, Command};
use std::time::Instant;
use tch::Kind;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rdv(port: u16, rank: usize, world: usize, timeout: Duration) -> Rendezvous {
    Rendezvous {
        timeout,
        local_addr: Some("127.0.0.1".into()),
        ..Rendezvous::new("127.0.0.1", port, rank, world)
    }
}

/// Runs `f(group)` on `world` Gloo ranks (threads of this process) and returns their results.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let pg = ProcessGroup::new(
                    Backend::Gloo,
                    &rdv(port, rank, world, Duration::from_secs(30)),
                )
                .unwrap();
                f(pg)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn gloo_collectives_compute_what_they_define() {
    for world in [2usize, 4] {
        let results = on_ranks(world, move |pg| {
            let r = pg.rank() as f32;
            let w = pg.world_size();
            let base = || Tensor::from_slice(&[1.0f32 + r, -r, 2.0 * r]);
            let mut out = Vec::new();
            for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min, ReduceOp::Avg] {
                let mut t = base();
                pg.all_reduce(&mut t, op).unwrap();
                out.push(vec_of(&t));
            }
            // Async: start two, wait in reverse order.
            let (mut a, mut b) = (base(), base() * 2.0);
            let wa = pg.all_reduce_async(&mut a, ReduceOp::Sum).unwrap();
            let wb = pg.all_reduce_async(&mut b, ReduceOp::Sum).unwrap();
            wb.wait().unwrap();
            wa.wait().unwrap();
            out.push(vec_of(&a));
            out.push(vec_of(&b));
            let mut t = base();
            pg.broadcast(&mut t, w - 1).unwrap();
            out.push(vec_of(&t));
            let mut gathered = Tensor::zeros([w as i64 * 3], (Kind::Float, Device::Cpu));
            pg.all_gather(&mut gathered, &base()).unwrap();
            out.push(vec_of(&gathered));
            // Part p of rank r's input is 10p + r.
            let input = Tensor::arange(w as i64, (Kind::Float, Device::Cpu))
                .repeat_interleave_self_int(2, None, None)
                * 10.0
                + r as f64;
            let mut part = Tensor::zeros([2], (Kind::Float, Device::Cpu));
            pg.reduce_scatter(&mut part, &input, ReduceOp::Sum).unwrap();
            out.push(vec_of(&part));
            pg.barrier().unwrap();
            out
        });
        let ranks: Vec<f32> = (0..world).map(|r| r as f32).collect();
        let sum_r: f32 = ranks.iter().sum();
        let wf = world as f32;
        let max_r = wf - 1.0;
        for (rank, got) in results.iter().enumerate() {
            let sum = vec![wf + sum_r, -sum_r, 2.0 * sum_r];
            assert_eq!(got[0], sum, "sum, world {world}");
            assert_eq!(got[1], vec![1.0 + max_r, 0.0, 2.0 * max_r], "max");
            assert_eq!(got[2], vec![1.0, -max_r, 0.0], "min");
            let avg: Vec<f32> = sum.iter().map(|s| s / wf).collect();
            assert_eq!(got[3], avg, "avg");
            assert_eq!(got[4], sum, "async a");
            assert_eq!(got[5], sum.iter().map(|s| 2.0 * s).collect::<Vec<_>>());
            assert_eq!(got[6], vec![1.0 + max_r, -max_r, 2.0 * max_r], "broadcast");
            let gathered: Vec<f32> = ranks.iter().flat_map(|r| [1.0 + r, -r, 2.0 * r]).collect();
            assert_eq!(got[7], gathered, "all_gather");
            let p = rank as f32 * 10.0 * wf + sum_r;
            assert_eq!(got[8], vec![p, p], "reduce_scatter, rank {rank}");
        }
    }
}

#[test]
fn misuse_is_refused_before_any_communication() {
    let results = on_ranks(2, |pg| {
        let mut t = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu)).transpose(0, 1);
        let non_contiguous = pg.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
        let mut out = Tensor::zeros([3], (Kind::Float, Device::Cpu));
        let sizes = pg
            .all_gather(&mut out, &Tensor::zeros([2], (Kind::Float, Device::Cpu)))
            .unwrap_err();
        let mut x = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let root = pg.broadcast(&mut x, 5).unwrap_err();
        // Still usable afterwards.
        pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
        [non_contiguous, sizes, root].map(|e| e.to_string())
    });
    for [a, b, c] in results {
        assert!(a.contains("contiguous"), "{a}");
        assert!(b.contains("3 elements are not 2 ranks × 2"), "{b}");
        assert!(c.contains("root 5"), "{c}");
    }
    let bad = ProcessGroup::new(
        Backend::Gloo,
        &rdv(free_port(), 2, 2, Duration::from_secs(1)),
    );
    assert!(matches!(bad, Err(Error::Usage(_))), "{bad:?}");
}

/// A peer process, started by the tests below: joins the group as rank 1 and
/// then either sleeps (a stuck peer) or waits to be killed.
#[test]
#[ignore = "a helper process for the dead-peer tests, not a test"]
fn peer_process() {
    let Ok(port) = std::env::var("C10D_TEST_PORT") else {
        return;
    };
    let pg = ProcessGroup::new(
        Backend::Gloo,
        &rdv(port.parse().unwrap(), 1, 2, Duration::from_secs(60)),
    )
    .unwrap();
    let mut t = Tensor::ones([1], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    std::thread::sleep(Duration::from_secs(120));
}

fn spawn_peer(port: u16) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "tests::peer_process", "--ignored", "--nocapture"])
        .env("C10D_TEST_PORT", port.to_string())
        .spawn()
        .unwrap()
}

#[test]
fn a_stuck_or_dead_peer_is_an_error_within_the_timeout() {
    let timeout = Duration::from_secs(3);
    // Stuck: rank 1 joined and did one all-reduce, then never calls another.
    let port = free_port();
    let mut peer = spawn_peer(port);
    let pg = ProcessGroup::new(Backend::Gloo, &rdv(port, 0, 2, timeout)).unwrap();
    let mut t = Tensor::ones([1], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(vec_of(&t), vec![2.0]);
    let started = Instant::now();
    let err = pg.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
    let took = started.elapsed();
    assert!(took < timeout * 4, "took {took:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("rank 0 of 2: all_reduce failed:"), "{msg}");
    // Dead: the peer is killed; the next collective fails instead of waiting.
    peer.kill().unwrap();
    peer.wait().unwrap();
    drop(pg);

    let port = free_port();
    let mut peer = spawn_peer(port);
    let pg = ProcessGroup::new(Backend::Gloo, &rdv(port, 0, 2, Duration::from_secs(30))).unwrap();
    let mut t = Tensor::ones([1], (Kind::Float, Device::Cpu));
    pg.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    peer.kill().unwrap();
    peer.wait().unwrap();
    let started = Instant::now();
    let err = pg.all_reduce(&mut t, ReduceOp::Sum).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("all_reduce failed"), "{err}");
}

#[test]
fn a_rank_that_never_comes_is_a_setup_error_within_the_timeout() {
    let started = Instant::now();
    let err = ProcessGroup::new(
        Backend::Gloo,
        &rdv(free_port(), 0, 2, Duration::from_secs(2)),
    )
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("rank 0 of 2: forming the gloo group at 127.0.0.1:"),
        "{msg}"
    );
}

#[test]
fn rendezvous_reads_torchrun_and_slurm_variables() {
    // One test touches the environment, so there is no race with others (nextest
    // also runs each test in its own process).
    for k in [
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ] {
        std::env::remove_var(k);
    }
    assert_eq!(
        Rendezvous::from_env().unwrap(),
        Rendezvous::new("127.0.0.1", 29500, 0, 1)
    );
    std::env::set_var("SLURM_PROCID", "3");
    std::env::set_var("SLURM_NTASKS", "4");
    std::env::set_var("MASTER_ADDR", "node7");
    let r = Rendezvous::from_env().unwrap();
    assert_eq!(
        (r.rank, r.world_size, r.master_addr.as_str()),
        (3, 4, "node7")
    );
    std::env::set_var("RANK", "1");
    std::env::set_var("MASTER_PORT", "x");
    let e = Rendezvous::from_env().unwrap_err().to_string();
    assert!(e.contains("MASTER_PORT = \"x\" is not a port"), "{e}");
}
