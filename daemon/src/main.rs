//! ferryd: see the library crate.

use std::process::ExitCode;

use clap::Parser;
use ferryd::config::{default_node_name, Cli, Cmd, ConfigError, Settings, StoreSpec};
use ferryd::daemon::{self, DaemonError};
use ferryd::store::{etcd::EtcdStore, file::FileStore, kube::KubeStore, Membership};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferryd: error: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let settings = match args
                .with_config_file()
                .and_then(|a| Settings::resolve(a, &default_node_name()))
            {
                Ok(s) => s,
                Err(ConfigError(e)) => return fail(e, 2),
            };
            tracing_subscriber::fmt()
                .with_max_level(settings.log_level)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            match runtime().block_on(run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e, 1),
            }
        }
        Cmd::Leave(a) => {
            let a = match (*a).into_run_args().with_config_file() {
                Ok(a) => a,
                Err(ConfigError(e)) => return fail(e, 2),
            };
            let node = a.node_name.clone().unwrap_or_else(default_node_name);
            let store =
                match StoreSpec::parse(a.store.as_deref().unwrap_or("file:/var/lib/ferry/store")) {
                    Ok(s) => s,
                    Err(ConfigError(e)) => return fail(e, 2),
                };
            let access = match a.etcd_access(&store) {
                Ok(x) => x,
                Err(ConfigError(e)) => return fail(e, 2),
            };
            let prefix = a.etcd_prefix.unwrap_or_else(|| "/ferry".into());
            let (kubeconfig, api_server) = (a.kubeconfig, a.api_server);
            let r: Result<(), DaemonError> = runtime().block_on(async {
                match store {
                    StoreSpec::File(dir) => FileStore::open(&dir)?.leave(&node).await?,
                    StoreSpec::Etcd(urls) => {
                        EtcdStore::open(&urls, &access, &prefix)
                            .await?
                            .leave(&node)
                            .await?
                    }
                    StoreSpec::Kubernetes => {
                        KubeStore::open(kubeconfig.as_deref(), api_server.as_deref())
                            .await?
                            .leave(&node)
                            .await?
                    }
                }
                Ok(())
            });
            match r {
                Ok(()) => {
                    eprintln!("ferryd: node {node:?} marked as left");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            }
        }
    }
}

async fn run(s: Settings) -> Result<(), DaemonError> {
    let (underlay, listener) = daemon::preflight(&s).await?;
    tracing::info!(node = %s.node_name, underlay = %underlay.name, ip = %underlay.ip, mtu = underlay.mtu, store = ?s.store, "starting");
    match s.store.clone() {
        StoreSpec::File(dir) => {
            let store = FileStore::open(&dir)?;
            daemon::run(s, store, underlay, listener).await
        }
        StoreSpec::Etcd(urls) => {
            let store = EtcdStore::open(&urls, &s.etcd_access, &s.etcd_prefix).await?;
            daemon::run(s, store, underlay, listener).await
        }
        StoreSpec::Kubernetes => {
            let store = KubeStore::open(s.kubeconfig.as_deref(), s.api_server.as_deref()).await?;
            tracing::info!(server = %store.server(), "Kubernetes API");
            daemon::run(s, store, underlay, listener).await
        }
    }
}
