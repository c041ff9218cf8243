use super::*;

fn fast() -> Argon2Config {
    Argon2Config {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
        verify_concurrency: 2,
        nice: 7,
        ..Argon2Config::default()
    }
}

/// The nice values of this process's argon2 threads, from /proc.
fn argon2_thread_nices() -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == THREAD_NAME {
            nices.extend(nice_in(&task.path().join("stat")));
        }
    }
    nices
}

/// The nice value in a `/proc/…/stat` file (field 19; the name before it may hold
/// spaces, so count from the closing parenthesis).
fn nice_in(stat: &std::path::Path) -> Option<i64> {
    let stat = std::fs::read_to_string(stat).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    after_name.split(' ').nth(16)?.parse().ok()
}

#[tokio::test]
async fn argon2_runs_on_its_own_threads_niced_as_configured_and_they_end_with_the_hasher() {
    // Other tests' hashers run in this process too: count ours by their nice value,
    // which no other test uses.
    let cfg = Argon2Config {
        nice: 13,
        verify_concurrency: 3,
        ..fast()
    };
    let own = || nice_in(std::path::Path::new("/proc/thread-self/stat")).unwrap();
    let before = own();
    let h = SecretHasher::new(Secret::new("p".repeat(32)), &cfg).unwrap();
    let phc = h.hash("s3cret").await.unwrap();
    assert!(h.verify("s3cret", &phc).await.unwrap());
    assert_eq!(
        own(),
        before,
        "only the argon2 threads are niced, not their creator"
    );
    let ours = || {
        argon2_thread_nices()
            .into_iter()
            .filter(|&n| n == 13)
            .count()
    };
    assert_eq!(ours(), 3, "three argon2 threads at nice 13");
    drop(h);
    // A thread ends when it next finds the queue closed; poll for that, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ours() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "argon2 threads outlived the hasher"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A hasher with a single argon2 thread, so the order of its jobs is known.
fn one_thread() -> SecretHasher {
    let cfg = Argon2Config {
        verify_concurrency: 1,
        ..fast()
    };
    SecretHasher::new(Secret::new("p".repeat(32)), &cfg).unwrap()
}

#[tokio::test]
async fn a_verification_abandoned_while_queued_is_never_run() {
    use futures::FutureExt;
    let h = one_thread();
    let phc = h.hash("s3cret").await.unwrap();
    // First in the queue: a job that holds the only thread until told to go on.
    // Polling a job once queues it.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let mut held = Box::pin(h.run(move || {
        let _ = wait.recv();
        Ok(())
    }));
    assert!((&mut held).now_or_never().is_none());
    // Second: a verification, given up on while it waits (queued, then dropped).
    assert!(h.verify("s3cret", &phc).now_or_never().is_none());
    go.send(()).unwrap();
    held.await.unwrap();
    // The queue is first in, first out: this one runs after the abandoned one.
    assert!(h.verify("s3cret", &phc).await.unwrap());
    assert_eq!(h.verifications(), 1, "the abandoned verification never ran");
}

#[tokio::test]
async fn a_full_queue_refuses_at_once_and_the_hasher_serves_on_after() {
    use futures::FutureExt;
    let h = SecretHasher::new(
        Secret::new("p".repeat(32)),
        &Argon2Config {
            verify_concurrency: 1,
            queue_depth: 2,
            ..fast()
        },
    )
    .unwrap();
    let phc = h.hash("s3cret").await.unwrap();
    // The only thread is held; the queue then takes two jobs and refuses the third.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (taken, thread_took) = std::sync::mpsc::channel::<()>();
    let mut held = Box::pin(h.run(move || {
        let _ = taken.send(());
        let _ = wait.recv();
        Ok(())
    }));
    assert!((&mut held).now_or_never().is_none());
    thread_took.recv().unwrap();
    let mut queued: Vec<_> = (0..2).map(|_| Box::pin(h.verify("s3cret", &phc))).collect();
    for q in &mut queued {
        assert!(q.now_or_never().is_none(), "queued");
    }
    assert!(matches!(
        h.verify("s3cret", &phc).await,
        Err(HashError::Busy(2))
    ));
    go.send(()).unwrap();
    held.await.unwrap();
    for q in queued {
        assert!(q.await.unwrap());
    }
    assert!(h.verify("s3cret", &phc).await.unwrap());
}

#[tokio::test]
async fn a_panicking_job_fails_alone_and_the_thread_serves_on() {
    let h = one_thread();
    let failed = h.run(|| -> Result<(), HashError> { panic!("boom") }).await;
    assert!(matches!(failed, Err(HashError::Worker(_))), "{failed:?}");
    let phc = h.hash("s3cret").await.unwrap();
    assert!(h.verify("s3cret", &phc).await.unwrap());
}

#[tokio::test]
async fn hash_verifies_only_with_the_same_secret_and_pepper() {
    let pepper = Secret::new("p".repeat(32));
    let h = SecretHasher::new(pepper, &fast()).unwrap();
    let phc = h.hash("s3cret").await.unwrap();
    assert!(phc.starts_with("$argon2id$"));
    assert!(!phc.contains("s3cret"));
    assert!(h.verify("s3cret", &phc).await.unwrap());
    assert!(!h.verify("s3creT", &phc).await.unwrap());
    let other = SecretHasher::new(Secret::new("q".repeat(32)), &fast()).unwrap();
    assert!(!other.verify("s3cret", &phc).await.unwrap());
    assert_eq!(h.verifications(), 2);
}

/// The kept memory serves hashes of any parameters: smaller ones in part of it,
/// bigger ones (an older setting) from memory of their own, and no verification sees
/// what the one before it left.
#[tokio::test]
async fn hashes_of_other_parameters_verify_in_turn() {
    let pepper = || Secret::new("p".repeat(32));
    let with = |memory_kib, iterations| {
        SecretHasher::new(
            pepper(),
            &Argon2Config {
                memory_kib,
                iterations,
                verify_concurrency: 1,
                ..fast()
            },
        )
        .unwrap()
    };
    let (small, this, big) = (with(32, 3), with(64, 1), with(256, 2));
    let hashes = [
        small.hash("one").await.unwrap(),
        this.hash("two").await.unwrap(),
        big.hash("three").await.unwrap(),
    ];
    assert!(hashes[2].contains("m=256,t=2"), "{}", hashes[2]);
    for _ in 0..2 {
        for (phc, secret) in hashes.iter().zip(["one", "two", "three"]) {
            assert!(this.verify(secret, phc).await.unwrap(), "{phc}");
            assert!(!this.verify("four", phc).await.unwrap(), "{phc}");
        }
    }
    assert_eq!(this.verifications(), 12);
}

/// keygate's hashes are argon2's own: its `verify_password` accepts them, with the
/// pepper and the right secret only.
#[tokio::test]
async fn argon2s_own_verifier_accepts_keygates_hashes() {
    use argon2::password_hash::PasswordVerifier;
    let h = SecretHasher::new(Secret::new("p".repeat(32)), &fast()).unwrap();
    let phc = h.hash("s3cret").await.unwrap();
    assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
    let parsed = PasswordHash::new(&phc).unwrap();
    let (pepper, other) = ("p".repeat(32), "q".repeat(32));
    let verifies = |pepper: &str, secret: &[u8]| {
        Argon2::new_with_secret(
            pepper.as_bytes(),
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(64, 1, 1, None).unwrap(),
        )
        .unwrap()
        .verify_password(secret, &parsed)
        .is_ok()
    };
    assert!(verifies(&pepper, b"s3cret"));
    assert!(!verifies(&pepper, b"s3creT"));
    assert!(!verifies(&other, b"s3cret"));
    // Two hashes of one secret differ by their salt.
    assert_ne!(h.hash("s3cret").await.unwrap(), phc);
}

#[tokio::test]
async fn a_stored_hash_far_costlier_than_the_setting_is_refused_not_computed() {
    let h = SecretHasher::new(Secret::new("p".repeat(32)), &fast()).unwrap();
    let phc = h.hash("s3cret").await.unwrap();
    let costly = phc.replace("m=64,t=1,p=1", "m=4194304,t=1,p=1");
    assert_ne!(costly, phc);
    assert!(matches!(
        h.verify("s3cret", &costly).await,
        Err(HashError::BadStoredHash)
    ));
    let four_times = phc.replace("m=64,t=1,p=1", "m=256,t=4,p=1");
    assert!(matches!(h.verify("s3cret", &four_times).await, Ok(false)));
}

#[tokio::test]
async fn a_corrupt_stored_hash_is_an_error_not_a_mismatch() {
    let h = SecretHasher::new(Secret::new("p".repeat(32)), &fast()).unwrap();
    assert!(matches!(
        h.verify("x", "not-a-phc").await,
        Err(HashError::BadStoredHash)
    ));
}
