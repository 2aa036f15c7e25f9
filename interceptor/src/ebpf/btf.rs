//! Member offsets of kernel structures, from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The connect programs follow `current->mm->exe_file->f_inode` to record the executable that
//! called connect(). Rust eBPF programs have no CO-RE relocations, so the offsets are looked up
//! here, at load time, and handed to the programs in their `IC_TASK_OFFSETS` global. aya-obj
//! parses BTF but keeps struct members private; the format needed here (type records, member
//! lists, string table) is small and stable, so it is read directly.

use std::collections::HashMap;

use interceptor_common::{
    OFF_FILE_INODE, OFF_INODE_INO, OFF_INODE_SB, OFF_MM_EXE_FILE, OFF_SB_DEV, OFF_SLOTS,
    OFF_TASK_COMM, OFF_TASK_GROUP_LEADER, OFF_TASK_MM, OFF_VALID,
};

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub(super) enum BtfError {
    #[error("reading kernel BTF: {0}")]
    Io(#[from] std::io::Error),
    #[error("kernel BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no member {0}")]
    NoMember(String),
}

struct Member {
    name: u32,
    ty: u32,
    /// Bit offset (bitfields are never followed here).
    bits: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// The referenced type for typedef/const/volatile/... .
    ty: u32,
    members: Vec<Member>,
}

pub(super) struct KernelBtf {
    strings: Vec<u8>,
    /// Index = type id (0 is `void`).
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed("truncated"))
}

impl KernelBtf {
    pub(super) fn from_sys_fs() -> Result<KernelBtf, BtfError> {
        KernelBtf::parse(&std::fs::read("/sys/kernel/btf/vmlinux")?)
    }

    pub(super) fn parse(data: &[u8]) -> Result<KernelBtf, BtfError> {
        if data.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section out of bounds"))
        };
        let tdata = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut types = vec![Type {
            kind: 0,
            name: 0,
            ty: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < tdata.len() {
            let name = u32_at(tdata, at)?;
            let info = u32_at(tdata, at + 4)?;
            let size_or_type = u32_at(tdata, at + 8)?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            let mut members = Vec::new();
            at += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let off = u32_at(tdata, m + 8)?;
                        members.push(Member {
                            name: u32_at(tdata, m)?,
                            ty: u32_at(tdata, m + 4)?,
                            bits: if kflag { off & 0xff_ffff } else { off },
                        });
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => 0,
            };
            types.push(Type {
                kind,
                name,
                ty: size_or_type,
                members,
            });
        }
        let mut btf = KernelBtf {
            strings,
            types,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name != 0 {
                let name = btf.name(t.name).to_owned();
                // Forward-declared duplicates have no members; keep the full definition.
                if !t.members.is_empty() || !btf.structs.contains_key(&name) {
                    btf.structs.insert(name, id as u32);
                }
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Follows typedef/const/volatile/restrict/type tags to the underlying type.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.ty
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in struct `ty`, looking into anonymous struct/union members.
    fn find(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name != 0 {
                if self.name(m.name) == member {
                    return (m.bits % 8 == 0).then_some(m.bits / 8);
                }
            } else if let Some(inner) = self.resolve(m.ty)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(off) = self.find(inner, member, depth + 1)
            {
                return Some(m.bits / 8 + off);
            }
        }
        None
    }

    pub(super) fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::NoMember(format!("{strukt}.{member}"));
        let id = *self.structs.get(strukt).ok_or_else(missing)?;
        let t = self.types.get(id as usize).ok_or_else(missing)?;
        self.find(t, member, 0).ok_or_else(missing)
    }

    /// The `IC_TASK_OFFSETS` value for this kernel.
    pub(super) fn task_offsets(&self) -> Result<[u32; OFF_SLOTS], BtfError> {
        let mut o = [0u32; OFF_SLOTS];
        for (slot, strukt, member) in [
            (OFF_TASK_MM, "task_struct", "mm"),
            (OFF_TASK_GROUP_LEADER, "task_struct", "group_leader"),
            (OFF_TASK_COMM, "task_struct", "comm"),
            (OFF_MM_EXE_FILE, "mm_struct", "exe_file"),
            (OFF_FILE_INODE, "file", "f_inode"),
            (OFF_INODE_INO, "inode", "i_ino"),
            (OFF_INODE_SB, "inode", "i_sb"),
            (OFF_SB_DEV, "super_block", "s_dev"),
        ] {
            o[slot] = self.member_offset(strukt, member)?;
        }
        o[OFF_VALID] = 1;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernels_offsets() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            eprintln!("no kernel BTF here: skipped");
            return;
        };
        let o = btf.task_offsets().unwrap();
        assert_eq!(o[OFF_VALID], 1);
        // The members sit inside their structs, and pointers are 8-byte aligned.
        for slot in [
            OFF_TASK_MM,
            OFF_TASK_GROUP_LEADER,
            OFF_MM_EXE_FILE,
            OFF_INODE_SB,
        ] {
            assert_eq!(o[slot] % 8, 0, "slot {slot}: {o:?}");
        }
        assert!(o[OFF_TASK_COMM] > o[OFF_TASK_MM], "{o:?}");
        assert!(btf.member_offset("task_struct", "no_such_member").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(KernelBtf::parse(b"").is_err());
        assert!(KernelBtf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0, 0xff, 0xff]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 100, 0, 0] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        assert!(KernelBtf::parse(&hdr).is_err());
    }
}
