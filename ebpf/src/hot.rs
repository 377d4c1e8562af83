//! The hot-page store of `steer.bpf.c`, seen from user space: the size chosen at load time,
//! the slot array's file descriptor (the server maps it and writes slots under their seqlock;
//! see `bluebridge_xsk::hot`), and the index from a page's address to its slot.

use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{Array, HashMap, Map, MapData};

use crate::{Steer, SteerError, consts};

/// Bytes of one slot (`struct bb_hot_slot`): its header and one page.
pub const HOT_SLOT_SIZE: usize = consts::BB_HOT_SLOT_SIZE as usize;

/// The index key of a page: its address's bytes 0..14 (prefix, host, handle), then 0, 0.
pub type HotKey = [u8; consts::BB_HOT_KEY_SIZE as usize];

/// The key of the page an address names (its opcode and op-flag bytes are not part of it).
pub fn hot_key(addr: &std::net::Ipv6Addr) -> HotKey {
    let mut k = addr.octets();
    k[14] = 0;
    k[15] = 0;
    k
}

/// One handle on the index map (`hot_index`): each worker holds its own and writes the keys
/// of its own pages only.
pub struct HotIndex {
    map: HashMap<MapData, HotKey, u32>,
}

impl std::fmt::Debug for HotIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HotIndex { .. }")
    }
}

impl HotIndex {
    /// From now on XDP finds the page `key` in slot `slot` (whose contents must already be
    /// valid: the index is only a hint, XDP checks the slot's own key under its seqlock).
    pub fn insert(&mut self, key: &HotKey, slot: u32) -> Result<(), SteerError> {
        self.map
            .insert(key, slot, 0)
            .map_err(|source| SteerError::Map {
                what: format!("indexing hot slot {slot}"),
                source,
            })
    }

    /// Forgets `key` (nothing if it is not there).
    pub fn remove(&mut self, key: &HotKey) -> Result<(), SteerError> {
        match self.map.remove(key) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(SteerError::Map {
                what: "removing a hot page from the index".into(),
                source,
            }),
        }
    }
}

impl Steer {
    fn hot_map(&self, name: &'static str) -> Result<&MapData, SteerError> {
        match self.ebpf.map(name) {
            Some(Map::Array(m) | Map::HashMap(m)) => Ok(m),
            _ => Err(SteerError::Missing(name)),
        }
    }

    /// Slots in the hot-page store (set at load: [`Steer::load_with_hot_slots`]).
    pub fn hot_slots(&self) -> u32 {
        self.hot_slots
    }

    /// A descriptor of the slot array, to map it (`BPF_F_MMAPABLE`: slot `i` lies at byte
    /// `i × HOT_SLOT_SIZE`).
    pub fn hot_slots_fd(&self) -> Result<OwnedFd, SteerError> {
        self.hot_map_fd("hot_slots")
    }

    /// A descriptor of its own for map `name`.
    fn hot_map_fd(&self, name: &'static str) -> Result<OwnedFd, SteerError> {
        self.hot_map(name)?
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| SteerError::Pin {
                what: format!("duplicating the {name} descriptor"),
                why: e.to_string(),
            })
    }

    /// A new handle on the index (one per worker).
    pub fn hot_index(&self) -> Result<HotIndex, SteerError> {
        let fd = self.hot_map_fd("hot_index")?;
        let what = || "opening hot_index".to_string();
        let data = MapData::from_fd(fd).map_err(|source| SteerError::Map {
            what: what(),
            source,
        })?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(|source| SteerError::Map {
            what: what(),
            source,
        })?;
        Ok(HotIndex { map })
    }

    /// Writes slot `slot` whole through the map syscall (fixtures; a server writes its mapping).
    pub fn write_hot_slot(
        &mut self,
        slot: u32,
        bytes: &[u8; HOT_SLOT_SIZE],
    ) -> Result<(), SteerError> {
        self.set_array("hot_slots", slot, bytes)
    }

    /// Slot `slot` as the map syscall reads it.
    pub fn read_hot_slot(&self, slot: u32) -> Result<[u8; HOT_SLOT_SIZE], SteerError> {
        let a: Array<&MapData, [u8; HOT_SLOT_SIZE]> = Array::try_from(
            self.ebpf
                .map("hot_slots")
                .ok_or(SteerError::Missing("hot_slots"))?,
        )
        .map_err(|source| SteerError::Map {
            what: "hot_slots map".into(),
            source,
        })?;
        a.get(&slot, 0).map_err(|source| SteerError::Map {
            what: format!("reading hot slot {slot}"),
            source,
        })
    }
}

/// A slot's `sum` field for page bytes `data`: their ones' complement sum in 16-bit words of
/// host byte order (what the kernel's `csum_partial` computes), folded to 16 bits.
pub fn hot_page_sum(data: &[u8]) -> u32 {
    let be = bluebridge_proto::checksum::Checksum::new()
        .add_bytes(data)
        .sum16();
    u32::from(u16::from_ne_bytes(be.to_be_bytes()))
}
