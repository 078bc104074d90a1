//! [`AgentInfo`]: what the server tells the client agent about a session's disk
//! (`GET /agent/TOKEN` on the HTTP listener), shared by both ends so the format is one.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The format [`AgentInfo`] is written in; an agent refuses another.
pub const AGENT_INFO_FORMAT: u32 = 1;

/// Where the agent keeps a session's writes, as the vdisk decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentWrites {
    /// A standard vdisk whose writes are discarded when the session ends: the agent keeps
    /// them on the client (RAM or its disk) and may cache the base image's blocks on the
    /// client's disk across boots, keyed by `image` and `generation`.
    Local,
    /// A private vdisk, or a standard one whose overlay is kept across sessions: writes
    /// go to the server, and nothing of the disk is cached on the client across boots
    /// (the server holds bytes the base image does not).
    Server,
}

/// One server the agent may fail over to (`GET /servers`): every server sharing the
/// catalog that is alive, as the answering server sees them, itself first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    /// Its name, for logs.
    pub name: String,
    /// Where it serves NBD (`HOST:PORT`).
    pub nbd: String,
    /// The base URL of its HTTP listener, if clients reach it.
    pub http: Option<String>,
}

/// What `GET /servers` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerList {
    /// [`AGENT_INFO_FORMAT`].
    pub format: u32,
    /// The servers, the answering one first.
    pub servers: Vec<ServerEntry>,
}

impl ServerList {
    /// The JSON the server sends.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server list serialises")
    }

    /// Reads what a server sent, refusing another format.
    pub fn from_json(text: &str) -> Result<Self> {
        let list: ServerList = parse(text, "list of servers")?;
        check_format(list.format, "list of servers")?;
        Ok(list)
    }
}

/// `text` as a `what` the server sent.
fn parse<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("the server's {what} does not parse: {e}"),
        )
    })
}

/// `Unsupported` unless a `what` the server sent is in [`AGENT_INFO_FORMAT`].
fn check_format(format: u32, what: &str) -> Result<()> {
    if format != AGENT_INFO_FORMAT {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the server speaks {what} format {format}, this agent {AGENT_INFO_FORMAT}: use an agent of the server's version"
            ),
        ));
    }
    Ok(())
}

/// A session's disk as the agent needs to know it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// [`AGENT_INFO_FORMAT`].
    pub format: u32,
    /// The vdisk's name.
    pub vdisk: String,
    /// The client's MAC: with the vdisk, what a new session is opened for when the server
    /// ended this one (`/ipxe/MAC/VDISK`).
    pub client: String,
    /// Size in bytes.
    pub size: u64,
    /// The base image's identity ([`crate::SourceInfo::identity`]).
    pub image: String,
    /// The base image's generation as the server's caches key it.
    pub generation: String,
    /// Where writes go.
    pub writes: AgentWrites,
    /// The boot profile's block size (0 without a profile).
    pub block_size: u64,
    /// The vdisk's boot set for this image and generation, in typical first-touch order
    /// (block numbers of `block_size`); empty when no profile matches.
    pub boot_set: Vec<u64>,
}

impl AgentInfo {
    /// The JSON the server sends.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("agent info serialises")
    }

    /// Reads what a server sent, refusing another format and nonsense geometry.
    pub fn from_json(text: &str) -> Result<Self> {
        let info: AgentInfo = parse(text, "agent info")?;
        check_format(info.format, "agent info")?;
        if !info.boot_set.is_empty() {
            let valid =
                (512..=16 << 20).contains(&info.block_size) && info.block_size.is_power_of_two();
            let blocks = info.size.div_ceil(info.block_size.max(1));
            if !valid || info.boot_set.iter().any(|&b| b >= blocks) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "the server's boot set names blocks outside the disk",
                ));
            }
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> AgentInfo {
        AgentInfo {
            format: AGENT_INFO_FORMAT,
            vdisk: "deb".into(),
            client: "52:54:00:00:00:01".into(),
            size: 1 << 20,
            image: "file:/srv/deb.img".into(),
            generation: "7".into(),
            writes: AgentWrites::Local,
            block_size: 65536,
            boot_set: vec![3, 0, 15],
        }
    }

    #[test]
    fn agent_info_round_trips_and_refuses_blocks_past_the_end_or_another_format() {
        let text = info().to_json();
        assert!(text.contains("\"writes\":\"local\""));
        assert_eq!(AgentInfo::from_json(&text).unwrap(), info());
        let past = AgentInfo {
            boot_set: vec![16],
            ..info()
        };
        assert!(AgentInfo::from_json(&past.to_json()).is_err());
        let odd = AgentInfo {
            block_size: 1000,
            ..info()
        };
        assert!(AgentInfo::from_json(&odd.to_json()).is_err());
        let newer = AgentInfo {
            format: 2,
            ..info()
        };
        let err = AgentInfo::from_json(&newer.to_json()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(AgentInfo::from_json("{").is_err());
    }
}
