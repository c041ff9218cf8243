//! Where each Redis key lives: the partitions' hash tags and Cluster slots, the name of
//! every Redis key the store uses, and the check that the data was written with as many
//! partitions as configured. It names keys; reading and writing them is the other files'.

use redis::Script;

use super::conn::Conn;
use super::records::RecordFormat;
use super::{RedisStore, RECORD_BUCKETS};
use crate::store::{DelegationsOf, Owner, StoreError};

/// Where each Redis key lives: the partitions' hash tags.
pub(super) struct Layout {
    pub(super) ns: String,
    pub(super) tags: Vec<String>,
}

/// Redis Cluster's slots (CRC16 of the hash tag, modulo this).
const SLOTS: u16 = 16384;

/// The slot a hash tag puts its keys in.
pub fn slot_of_tag(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % SLOTS
}

/// The hash tag of `partition` of `partitions` (see `Layout::new`).
pub fn partition_tag(partitions: usize, partition: usize) -> String {
    if partitions <= 1 {
        return "keys".to_owned();
    }
    let width = usize::from(SLOTS) / partitions;
    let band = (partition * width)..((partition + 1) * width);
    (0u32..)
        .map(|n| format!("k{partition}.{n}"))
        .find(|tag| band.contains(&usize::from(slot_of_tag(tag))))
        .expect("a range of at least 64 slots is hit within a few thousand tries")
}

impl Layout {
    /// With one partition the tag is `keys`. With more, partition `i`'s tag is the first of
    /// `k<i>.0`, `k<i>.1`, … whose slot falls in the `i`-th of `partitions` equal ranges of
    /// the slots: however a Cluster splits its slots into ranges, the partitions spread as
    /// evenly as the ranges do (a tag hashed at random would leave that to chance).
    pub(super) fn new(ns: &str, partitions: usize) -> Layout {
        Layout {
            ns: ns.to_owned(),
            tags: (0..partitions.max(1))
                .map(|i| partition_tag(partitions, i))
                .collect(),
        }
    }

    pub(super) fn partitions(&self) -> usize {
        self.tags.len()
    }

    fn hash_of(&self, name: &str) -> usize {
        crc32fast::hash(name.as_bytes()) as usize
    }

    /// The partition a key id, partner id or rule key belongs to.
    pub(super) fn partition_of(&self, name: &str) -> usize {
        self.hash_of(name) % self.partitions()
    }

    fn key(&self, partition: usize, rest: &str) -> String {
        format!("{}:{{{}}}:{rest}", self.ns, self.tags[partition])
    }

    /// Keys outside the partitions (the audit trail, the layout marker), under the tag of
    /// every earlier keygate.
    fn global(&self, rest: &str) -> String {
        format!("{}:{{keys}}:{rest}", self.ns)
    }
}

impl RedisStore {
    /// The Redis key that holds `key_id`'s record: its own hash with one partition; with
    /// more, one of its partition's `RECORD_BUCKETS` hashes, where the record is the field
    /// named by the key id (a field costs a third of what a Redis key does).
    pub fn key_key(&self, key_id: &str) -> String {
        let p = self.partition_of(key_id);
        match self.format() {
            RecordFormat::Hash => self.layout.key(p, &format!("key:{key_id}")),
            RecordFormat::Packed => {
                let bucket =
                    self.layout.hash_of(key_id) / self.layout.partitions() % RECORD_BUCKETS;
                self.layout.key(p, &format!("keys:{bucket}"))
            }
        }
    }

    pub(super) fn index_key(&self, partition: usize, owner: &Owner) -> String {
        self.layout.key(partition, &owner.index_name())
    }

    /// An owner's index lives in the owner's partition: one sorted set per owner, whatever
    /// the partitions of its keys.
    pub(super) fn index_partition(&self, owner: &Owner) -> usize {
        self.layout.partition_of(&owner.index_name())
    }

    /// Both sets of a delegation live in the partner's partition.
    pub(super) fn delegation_key(&self, partition: usize, of: &DelegationsOf) -> String {
        match of {
            DelegationsOf::Partner(p) => self.layout.key(partition, &format!("deleg:partner:{p}")),
            DelegationsOf::Tenant(t) => self.layout.key(partition, &format!("deleg:tenant:{t}")),
        }
    }

    pub(super) fn tokens_key(&self, partition: usize) -> String {
        self.layout.key(partition, "tokens")
    }

    pub(super) fn tokens_expiry_key(&self, partition: usize) -> String {
        self.layout.key(partition, "tokens:expiry")
    }

    pub fn events_key(&self, partition: usize) -> String {
        self.layout.key(partition, "events")
    }

    pub(super) fn audit_key(&self) -> String {
        self.layout.global("audit")
    }

    fn layout_key(&self) -> String {
        self.layout.global("layout")
    }

    /// Refuses data written with another number of partitions: its records and events
    /// would be looked for in the wrong places, and revocations missed. The first keygate
    /// to reach an empty store records its number.
    pub(super) async fn check_layout(&self, conn: &mut Conn) -> Result<(), StoreError> {
        let want = self.layout.partitions();
        let recorded: String = self
            .run(
                "checking the store's layout",
                Script::new(include_str!("../lua/layout.lua"))
                    .key(self.layout_key())
                    .key(self.layout.global("events"))
                    .key(self.audit_key())
                    .arg(want)
                    .invoke_async(conn),
            )
            .await?;
        let found: usize = recorded
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("{} is not a number", self.layout_key())))?;
        if found == want {
            return Ok(());
        }
        Err(StoreError::Corrupt(format!(
            "the store under namespace {:?} was written with {found} stream partition(s), and \
             store.stream_partitions is {want}: keygate would look for keys and revocations \
             in the wrong places and miss them. Set store.stream_partitions: {found} (see \
             \"Changing the stream partitions\" in docs/operations.md)",
            self.layout.ns
        )))
    }
}
