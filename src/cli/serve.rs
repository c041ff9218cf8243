//! `keygate serve`: load and check the configuration, run the server until SIGINT or
//! SIGTERM, and in dev mode write (and remove) the state file through which the CLI on
//! this machine finds the dev server. It must not talk to a running keygate: the other
//! commands do, through `mod.rs`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::Args;
use serde_json::json;

use crate::config::{Config, Secrets, DEV_CONFIG};
use crate::file_watch::FileWatch;
use crate::server;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// YAML configuration file.
    #[arg(long, env = "KEYGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Zero-setup mode: in-memory store, the built-in sample policy (unless --config),
    /// generated pepper and admin token (unless set), and a state file the CLI reads.
    #[arg(long)]
    pub dev: bool,
    /// Check everything `serve` checks before it binds its ports and reaches the store
    /// (the configuration, the secrets, the session keys, the JWT issuers' keys, the TLS
    /// files, the policy, the error shapes) and exit: 0 and `configuration ok`, or the
    /// error `serve` would stop with, naming its field. Needs the same environment
    /// (secrets) and files as `serve`; binds no port and needs no store.
    #[arg(long)]
    pub check: bool,
    /// With --check: also compare with the configuration file a running keygate was
    /// started with, and fail naming each setting that a live reload would refuse
    /// (listeners, store, caches …: they need a restart).
    #[arg(long, requires = "check", value_name = "FILE")]
    pub against: Option<PathBuf>,
}

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before the file is read: a change made from here on is reloaded.
    let changes = args
        .config
        .as_ref()
        .map(|path| FileWatch::new([path.clone()], server::FILE_CHECK));
    let yaml = match &args.config {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read configuration file {}", path.display()))?,
        ),
        None if args.dev => Some(DEV_CONFIG.to_owned()),
        None => None,
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = Config::load(yaml.as_deref(), env.iter().cloned())?;
    let secrets = Secrets::from_env(args.dev)?;
    crate::telemetry::init_logging(&config.logging, &config.traces).map_err(|e| anyhow!(e))?;
    let admin_token = secrets.admin_token.clone();
    // One routine reads and checks all that serve needs short of its ports and its store,
    // so --check refuses exactly what serve refuses, with the same message.
    let app = server::App::build(config, secrets)?;
    if args.check {
        if let Some(running) = &args.against {
            let text = std::fs::read_to_string(running)
                .with_context(|| format!("cannot read configuration file {}", running.display()))?;
            let running = Config::load(Some(&text), std::env::vars())
                .with_context(|| format!("{} (--against)", running.display()))?;
            let restart = running.restart_only_changes(&app.config);
            if !restart.is_empty() {
                anyhow::bail!(
                    "configuration ok, but a running keygate would refuse it live: {} needs a restart",
                    restart.join(", ")
                );
            }
            println!("configuration ok, and a running keygate takes it live");
            return Ok(());
        }
        println!("configuration ok");
        return Ok(());
    }
    if !args.dev && app.config.store.backend == crate::config::StoreBackend::Memory {
        tracing::warn!(
            event = "server.memory_store",
            "store.backend is memory: keys live only as long as this process"
        );
    }
    if let Some((path, changes)) = args.config.as_ref().zip(changes) {
        // Followed for changes to the decision sections (docs/operations.md).
        app.live.reload_from(path.clone(), changes, env);
    }
    let running = server::start(std::sync::Arc::new(app)).await?;
    let state = if args.dev {
        let path = dev_state_path();
        write_dev_state(&path, &running, admin_token.expose())?;
        eprintln!(
            "keygate is running in dev mode (in-memory store, sample policy).\n  \
             gRPC (Envoy ext_authz, keygate.v1): {}\n  admin: {}\n  http: {}\n\
             The CLI on this machine finds the admin credential in {}.\n\
             Try: keygate keys create --tenant 9f1c7d4e-2b7a-4c1e-9d55-0b3f6a2e8c11 --scopes contacts:read",
            running.grpc,
            running.admin,
            running.http,
            path.display()
        );
        Some(path)
    } else {
        None
    };
    let drainer = running.drainer();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!(event = "server.shutting_down", "shutting down");
        drainer.drain().await;
    });
    let result = running.wait().await;
    crate::telemetry::flush_traces();
    if let Some(path) = state {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("can install a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Where `serve --dev` leaves its addresses and admin credential for the CLI.
pub fn dev_state_path() -> PathBuf {
    let dir = std::env::var_os("KEYGATE_STATE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("keygate")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/keygate")))
        .unwrap_or_else(|| std::env::temp_dir().join("keygate"));
    dir.join("dev.json")
}

fn write_dev_state(
    path: &Path,
    running: &server::Running,
    admin_token: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let body = json!({
        "admin_url": format!("http://{}", running.admin),
        "admin_token": admin_token,
        "grpc_url": format!("http://{}", loopback_for(running.grpc)),
        "http_url": format!("http://{}", running.http),
    });
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(body.to_string().as_bytes())?;
    Ok(())
}

fn loopback_for(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

pub(super) fn read_dev_state() -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dev_state_path()).ok()?;
    serde_json::from_str(&text).ok()
}
