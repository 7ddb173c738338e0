//! `store.conf`: how every daemon and client finds the cluster. Modelled on ceph.conf.
//!
//! ```ini
//! [global]
//! fsid = 0d4c3c3e-...
//! mon_initial_members = a, b, c
//! mon_host = 127.0.0.1:6789, 127.0.0.1:6790, 127.0.0.1:6791
//!
//! [mon]
//! mon_data = /var/lib/store/mon/$id
//! osd_heartbeat_grace = 20
//!
//! [osd.0]
//! osd_data = /var/lib/store/osd/0
//! ```
//!
//! Lookup order for a key asked by entity `mon.a`: section `[mon.a]`, then `[mon]`, then
//! `[global]`. Keys compare with spaces and dashes read as underscores (`mon host` ==
//! `mon_host`), as in Ceph. `$id`, `$name` and `$cluster_dir` (the conf file's directory)
//! are expanded in values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The environment variable that names the conf file when `--conf` is not given.
pub const CONF_ENV: &str = "STORE_CONF";
pub const DEFAULT_CONF_LOCAL: &str = "store.conf";
pub const DEFAULT_CONF_SYSTEM: &str = "/etc/store/store.conf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "no configuration found: pass --conf PATH, set ${CONF_ENV}, or create ./{DEFAULT_CONF_LOCAL} or {DEFAULT_CONF_SYSTEM}"
    )]
    NotFound,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: missing required setting '{key}' (in [global] or [{section}])")]
    Missing {
        path: PathBuf,
        key: String,
        section: String,
    },
    #[error("{path}: setting '{key}' = '{value}' is invalid: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        value: String,
        message: String,
    },
}

/// Picks the conf file: `--conf`, else `$STORE_CONF`, else `./store.conf`, else
/// `/etc/store/store.conf`. An explicitly named file must exist.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, ConfigError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(CONF_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    for candidate in [DEFAULT_CONF_LOCAL, DEFAULT_CONF_SYSTEM] {
        let p = PathBuf::from(candidate);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(ConfigError::NotFound)
}

/// A monitor's identity as the conf file gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonAddr {
    /// Raft node id: the 1-based position in `mon_initial_members`.
    pub id: u64,
    pub name: String,
    pub addr: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    path: PathBuf,
    sections: BTreeMap<String, BTreeMap<String, String>>,
}

fn normalize_key(k: &str) -> String {
    k.trim().replace([' ', '-'], "_").to_ascii_lowercase()
}

impl Config {
    /// Locates and loads the conf file.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let path = locate(explicit)?;
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&path, &text)
    }

    /// Parses conf text; `path` is used for messages and `$cluster_dir`.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let ini = ini::Ini::load_from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (name, props) in ini.iter() {
            let Some(name) = name else {
                if props.iter().next().is_some() {
                    return Err(ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: "settings before the first [section]; put them under [global]"
                            .into(),
                    });
                }
                continue;
            };
            let sec = sections.entry(name.trim().to_string()).or_default();
            for (k, v) in props.iter() {
                sec.insert(normalize_key(k), v.trim().to_string());
            }
        }
        Ok(Config {
            path: path.to_path_buf(),
            sections,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks a key up for `entity` (`mon.a`, `osd.3`, `client`, or `global`).
    pub fn get(&self, entity: &str, key: &str) -> Option<String> {
        let key = normalize_key(key);
        let kind = entity.split('.').next().unwrap_or(entity);
        let id = entity.split_once('.').map(|(_, id)| id).unwrap_or("");
        [entity, kind, "global"]
            .iter()
            .filter_map(|s| self.sections.get(*s))
            .find_map(|sec| sec.get(&key))
            .map(|v| self.expand(v, entity, id))
    }

    fn expand(&self, value: &str, entity: &str, id: &str) -> String {
        let dir = self
            .path
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = if dir.is_empty() { ".".to_string() } else { dir };
        value
            .replace("$cluster_dir", &dir)
            .replace("$name", entity)
            .replace("$id", id)
    }

    fn missing(&self, key: &str, entity: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.clone(),
            key: key.into(),
            section: entity.into(),
        }
    }

    pub fn require(&self, entity: &str, key: &str) -> Result<String, ConfigError> {
        self.get(entity, key)
            .ok_or_else(|| self.missing(key, entity))
    }

    /// A typed setting with a default.
    pub fn get_parsed<T: FromStr>(
        &self,
        entity: &str,
        key: &str,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(entity, key) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e: T::Err| ConfigError::Invalid {
                path: self.path.clone(),
                key: key.into(),
                value: v.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// The cluster id.
    pub fn fsid(&self) -> Result<String, ConfigError> {
        self.require("global", "fsid")
    }

    /// The monitors: `mon_initial_members` names paired in order with `mon_host` addresses.
    /// Without `mon_initial_members`, monitors are named `a`, `b`, `c`, ... in order.
    pub fn mons(&self) -> Result<Vec<MonAddr>, ConfigError> {
        let hosts = self.require("global", "mon_host")?;
        let addrs: Vec<String> = split_list(&hosts);
        if addrs.is_empty() {
            return Err(self.invalid("mon_host", &hosts, "lists no address"));
        }
        let names: Vec<String> = match self.get("global", "mon_initial_members") {
            Some(v) => split_list(&v),
            None => (0..addrs.len()).map(default_mon_name).collect(),
        };
        if names.len() != addrs.len() {
            return Err(self.invalid(
                "mon_initial_members",
                &names.join(","),
                &format!(
                    "names {} monitors but mon_host lists {} addresses",
                    names.len(),
                    addrs.len()
                ),
            ));
        }
        for a in &addrs {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(self.invalid("mon_host", a, "expected IP:PORT"));
            }
        }
        Ok(names
            .into_iter()
            .zip(addrs)
            .enumerate()
            .map(|(i, (name, addr))| MonAddr {
                id: i as u64 + 1,
                name,
                addr,
            })
            .collect())
    }

    fn invalid(&self, key: &str, value: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.clone(),
            key: key.into(),
            value: value.into(),
            message: message.into(),
        }
    }
}

/// Monitor names `a`..`z`, then `m26`, ...
pub fn default_mon_name(i: usize) -> String {
    if i < 26 {
        ((b'a' + i as u8) as char).to_string()
    } else {
        format!("m{i}")
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split([',', ' ', ';'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = "
[global]
fsid = abc
mon initial members = a, b
mon_host = 127.0.0.1:1, 127.0.0.1:2
[mon]
mon_data = $cluster_dir/mon-$id
grace = 20
[mon.b]
grace = 5
";

    #[test]
    fn lookup_order_and_expansion() {
        let c = Config::parse(Path::new("/etc/x/store.conf"), CONF).unwrap();
        assert_eq!(c.get("mon.a", "grace").as_deref(), Some("20"));
        assert_eq!(c.get("mon.b", "grace").as_deref(), Some("5"));
        assert_eq!(c.get("osd.1", "grace"), None);
        assert_eq!(c.get("mon.b", "mon-data").as_deref(), Some("/etc/x/mon-b"));
        assert_eq!(c.fsid().unwrap(), "abc");
        let mons = c.mons().unwrap();
        assert_eq!(mons[1].id, 2);
        assert_eq!(mons[1].name, "b");
        assert_eq!(mons[1].addr, "127.0.0.1:2");
        assert_eq!(c.get_parsed("mon.a", "grace", 1u64).unwrap(), 20);
    }

    #[test]
    fn bad_confs_give_clear_errors() {
        let p = Path::new("s.conf");
        let e = Config::parse(p, "[global]\nmon_host = nonsense\n")
            .unwrap()
            .mons()
            .unwrap_err();
        assert!(e.to_string().contains("expected IP:PORT"), "{e}");
        let e = Config::parse(p, "[global]\nfsid=1\n")
            .unwrap()
            .mons()
            .unwrap_err();
        assert!(e.to_string().contains("mon_host"), "{e}");
        let e = Config::parse(p, "[global\nx=1").unwrap_err();
        assert!(e.to_string().starts_with("s.conf"), "{e}");
        let c = Config::parse(p, "[mon]\ngrace = soon\n").unwrap();
        assert!(c.get_parsed("mon.a", "grace", 1u64).is_err());
    }
}
