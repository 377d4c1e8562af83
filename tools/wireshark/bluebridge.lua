-- BlueBridge dissector for Wireshark and tshark (Lua, Wireshark 3.6 and later).
--
-- Decodes the BlueBridge header, the address fields the IPv6 destination (requests) or source
-- (replies and notices) carries, every opcode's payload, statuses by name, and matches replies
-- to their requests (client address, port and request id): "Request in", "Response in" and
-- the response time. docs/protocol.md is the specification; docs/running.md ("Capturing")
-- says how to use this file:
--
--   tshark -X lua_script:tools/wireshark/bluebridge.lua -r capture.pcapng -Y bluebridge
--   wireshark -X lua_script:tools/wireshark/bluebridge.lua capture.pcapng
--
-- or copy it to ~/.local/lib/wireshark/plugins/. Registered on UDP port 47872 (0xbb00);
-- change it with the "BlueBridge UDP port" preference.

local bb = Proto("bluebridge", "BlueBridge remote memory")

local HEADER_LEN = 48
local PAGE_SIZE = 4096
local DEFAULT_PORT = 47872

local opcodes = {
    [0x01] = "PING", [0x02] = "STAT",
    [0x10] = "ALLOC", [0x11] = "ALLOC_WRITE", [0x12] = "ALLOC_BULK",
    [0x20] = "READ", [0x21] = "READ_BULK",
    [0x30] = "WRITE", [0x31] = "WRITE_BLIND", [0x32] = "WRITE_BULK",
    [0x40] = "UPDATE_ACQUIRE", [0x41] = "UPDATE_COMMIT", [0x42] = "UPDATE_RELEASE",
    [0x50] = "FREE", [0x51] = "FREE_BULK",
    [0x60] = "CAS", [0x61] = "FETCH_ADD",
    [0x70] = "SHARE", [0x71] = "DETACH",
    [0x80] = "MIGRATE_OUT", [0x81] = "MIGRATE_IN", [0x82] = "OWNERS", [0x83] = "RECLAIM",
    [0x90] = "INVALIDATE",
    [0xa0] = "GET_SHARED", [0xa1] = "GET_EXCLUSIVE", [0xa2] = "PUT", [0xa3] = "RENEW",
    [0xa4] = "REVOKE", [0xa5] = "READY",
    [0xb0] = "REPLICATE", [0xb1] = "BACKUP", [0xb2] = "REPLICA", [0xb3] = "PROMOTE",
}

local statuses = {
    [0] = "OK", [1] = "MALFORMED", [2] = "UNKNOWN_OPCODE", [3] = "INVALID_HANDLE",
    [4] = "STALE_HANDLE", [5] = "OUT_OF_RANGE", [6] = "OUT_OF_MEMORY", [7] = "LEASE_HELD",
    [8] = "LEASE_EXPIRED", [9] = "LEASE_INVALID", [10] = "FORBIDDEN", [11] = "MOVED",
    [12] = "UNSUPPORTED_VERSION", [13] = "MISALIGNED", [14] = "TOO_MANY", [15] = "BUSY",
    [16] = "INTERNAL", [17] = "UNREACHABLE", [18] = "OTHER_SHARD", [19] = "RECALLING",
    [20] = "FENCED",
}

-- Notices: reply-shaped frames with request id 0 that answer no request (§5.15, §5.18).
local notices = { [0x90] = true, [0xa4] = true, [0xa5] = true }

-- The STAT record's counters, in order (§5.10).
local stat_fields = {
    "pages_total", "pages_used", "requests", "errors", "duplicates", "malformed",
    "leases_held", "uptime_ms", "shards", "handoffs", "zero_copy", "stale",
    "handoff_dropped", "kernel_dropped", "bad_source", "reclaimed", "orphan_grace_ms",
    "copy_lease_ms", "copy_grants", "revokes", "recalling", "backup", "backup_epoch",
    "repl_lag_bytes", "repl_held", "repl_window_full", "replica_shards", "repl_copy_left",
    "repl_copy_total",
}

local f = {
    -- From the IPv6 address (§1).
    addr = ProtoField.ipv6("bluebridge.addr", "Address"),
    prefix = ProtoField.bytes("bluebridge.prefix", "Network prefix (/32)"),
    host = ProtoField.uint16("bluebridge.host", "Host id", base.HEX),
    handle = ProtoField.uint64("bluebridge.handle", "Page handle", base.HEX),
    shard = ProtoField.uint8("bluebridge.shard_field", "Shard field", base.DEC),
    opcode = ProtoField.uint8("bluebridge.opcode", "Opcode", base.HEX, opcodes),
    opflags = ProtoField.uint8("bluebridge.op_flags", "Op flags", base.HEX),
    -- The header (§2.4).
    version = ProtoField.uint8("bluebridge.version", "Version"),
    flags = ProtoField.uint8("bluebridge.flags", "Flags", base.HEX),
    flag_reply = ProtoField.bool("bluebridge.flags.reply", "REPLY", 8, nil, 0x01),
    flag_shared = ProtoField.bool("bluebridge.flags.shared", "SHARED", 8, nil, 0x02),
    flag_more = ProtoField.bool("bluebridge.flags.more", "MORE", 8, nil, 0x04),
    flag_retry = ProtoField.bool("bluebridge.flags.retry", "RETRY", 8, nil, 0x08),
    flag_inline = ProtoField.bool("bluebridge.flags.inline", "INLINE", 8, nil, 0x10),
    status = ProtoField.uint16("bluebridge.status", "Status", base.DEC, statuses),
    item = ProtoField.uint16("bluebridge.item", "Item"),
    count = ProtoField.uint16("bluebridge.count", "Count"),
    request_id = ProtoField.uint64("bluebridge.request_id", "Request id", base.HEX),
    offset = ProtoField.uint16("bluebridge.offset", "Offset"),
    length = ProtoField.uint16("bluebridge.length", "Length"),
    seg_max = ProtoField.uint16("bluebridge.seg_max", "Segment max"),
    reserved = ProtoField.uint16("bluebridge.reserved", "Reserved", base.HEX),
    lease = ProtoField.uint64("bluebridge.lease", "Lease", base.HEX),
    operand0 = ProtoField.uint64("bluebridge.operand0", "Operand 0", base.HEX),
    operand1 = ProtoField.uint64("bluebridge.operand1", "Operand 1", base.HEX),
    owner = ProtoField.ipv6("bluebridge.owner", "Owner (operand0/1)"),
    -- Payloads (§5).
    data = ProtoField.bytes("bluebridge.data", "Page data"),
    segment = ProtoField.string("bluebridge.segment", "Segment"),
    handle_item = ProtoField.uint64("bluebridge.item_handle", "Handle", base.HEX),
    item_status = ProtoField.uint16("bluebridge.item_status", "Item status", base.DEC, statuses),
    entry = ProtoField.bytes("bluebridge.entry", "Write entry"),
    entry_offset = ProtoField.uint16("bluebridge.entry.offset", "Offset"),
    entry_length = ProtoField.uint16("bluebridge.entry.length", "Length"),
    stat = ProtoField.uint64("bluebridge.stat", "Counter"),
    owner_entry = ProtoField.ipv6("bluebridge.owners.addr", "Owner"),
    owner_pages = ProtoField.uint32("bluebridge.owners.pages", "Pages"),
    owner_silent = ProtoField.uint32("bluebridge.owners.silent_ms", "Silent (ms)"),
    freed_page = ProtoField.ipv6("bluebridge.invalidate.page", "Freed page"),
    stream = ProtoField.bytes("bluebridge.stream", "Replication stream bytes"),
    padding = ProtoField.bytes("bluebridge.padding", "INLINE padding (room for the reply)"),
    -- Matching (§8).
    notice = ProtoField.bool("bluebridge.notice", "Notice (answers no request)"),
    request_in = ProtoField.framenum("bluebridge.request_in", "Request in", base.NONE,
        frametype.REQUEST),
    response_in = ProtoField.framenum("bluebridge.response_in", "Response in", base.NONE,
        frametype.RESPONSE),
    time = ProtoField.relative_time("bluebridge.time", "Response time"),
    retransmission = ProtoField.bool("bluebridge.retransmission", "Retransmission"),
}
local field_list = {}
for _, v in pairs(f) do
    field_list[#field_list + 1] = v
end
bb.fields = field_list

local ef = {
    short = ProtoExpert.new("bluebridge.short", "Shorter than the BlueBridge header",
        expert.group.MALFORMED, expert.severity.ERROR),
    bad_payload = ProtoExpert.new("bluebridge.bad_payload",
        "Payload does not match the header (§5)", expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("bluebridge.bad_version", "Not protocol version 1",
        expert.group.PROTOCOL, expert.severity.WARN),
    error_status = ProtoExpert.new("bluebridge.error_status", "Error status",
        expert.group.RESPONSE_CODE, expert.severity.NOTE),
    unknown_op = ProtoExpert.new("bluebridge.unknown_opcode", "Unknown opcode",
        expert.group.PROTOCOL, expert.severity.WARN),
    retransmission = ProtoExpert.new("bluebridge.retransmission", "Retransmitted request",
        expert.group.SEQUENCE, expert.severity.NOTE),
    no_request = ProtoExpert.new("bluebridge.no_request",
        "Reply to a request not in the capture", expert.group.SEQUENCE, expert.severity.NOTE),
}
bb.experts = { ef.short, ef.bad_payload, ef.version, ef.error_status, ef.unknown_op,
    ef.retransmission, ef.no_request }

bb.prefs.port = Pref.uint("BlueBridge UDP port", DEFAULT_PORT, "servers' UDP port")

local ip6_src = Field.new("ipv6.src")
local ip6_dst = Field.new("ipv6.dst")
local udp_srcport = Field.new("udp.srcport")
local udp_dstport = Field.new("udp.dstport")

-- Request/reply matching, filled on the first pass over the capture:
--   requests[key] = list of request frame numbers (key: client address, port, request id),
--   info[frame] = what that frame is linked to.
local requests = {}
local info = {}

function bb.init()
    requests = {}
    info = {}
end

local function u64(tvb, off)
    return tvb(off, 8):uint64()
end

local function hex64(v)
    return "0x" .. v:tohex()
end

-- The address fields of `addr` (a 16-byte TvbRange of the IPv6 header).
local function add_address(tree, addr, label)
    local t = tree:add(f.addr, addr)
    t:prepend_text(label .. " ")
    t:add(f.prefix, addr(0, 4))
    t:add(f.host, addr(4, 2))
    t:add(f.handle, addr(6, 8))
    t:add(f.shard, addr(6, 1))
    t:add(f.opcode, addr(14, 1))
    t:add(f.opflags, addr(15, 1))
end

local function segment_text(off, len)
    if off == 0 and len == PAGE_SIZE then
        return "the whole page"
    end
    return string.format("bytes %d..%d of the page", off, off + len)
end

local function add_data(tree, payload, off, len)
    if payload:len() == 0 then
        return
    end
    tree:add(f.segment, payload, segment_text(off, len))
    tree:add(f.data, payload)
end

-- Payload decoders; each returns false if the payload breaks §5's shape.

-- `count` items of `size` bytes each, one `field` per item, under `title`.
local function items(tree, payload, count, size, field, title)
    if payload:len() ~= count * size then
        return false
    end
    local t = tree:add(bb, payload, string.format("%s (%d)", title, count))
    for i = 0, count - 1 do
        t:add(field, payload(i * size, size)):prepend_text(string.format("[%d] ", i))
    end
    return true
end

local function handles(tree, payload, count)
    return items(tree, payload, count, 8, f.handle_item, "Handles")
end

local function write_entries(tree, payload, count)
    local at, n = 0, 0
    local t = tree:add(bb, payload, string.format("Write entries (%d)", count))
    while at < payload:len() do
        if payload:len() - at < 16 then
            return false
        end
        local len = payload(at + 10, 2):uint()
        local padded = math.floor((len + 7) / 8) * 8
        if payload:len() - at < 16 + padded then
            return false
        end
        local e = t:add(f.entry, payload(at, 16 + padded))
        e:set_text(string.format("[%d] handle %s, %s", n, hex64(u64(payload, at)),
            segment_text(payload(at + 8, 2):uint(), len)))
        e:add(f.handle_item, payload(at, 8))
        e:add(f.entry_offset, payload(at + 8, 2))
        e:add(f.entry_length, payload(at + 10, 2))
        if len > 0 then
            e:add(f.data, payload(at + 16, len))
        end
        at = at + 16 + padded
        n = n + 1
    end
    return n == count
end

local function stat_record(tree, payload)
    if payload:len() < 64 or payload:len() % 8 ~= 0 then
        return false
    end
    local t = tree:add(bb, payload, "STAT record")
    for i = 0, payload:len() / 8 - 1 do
        local name = stat_fields[i + 1] or string.format("field %d", i)
        t:add(f.stat, payload(i * 8, 8)):set_text(string.format("%s: %s", name,
            tostring(payload(i * 8, 8):uint64())))
    end
    return true
end

local function owners(tree, payload, count)
    if payload:len() ~= count * 24 then
        return false
    end
    local t = tree:add(bb, payload, string.format("Owners (%d)", count))
    for i = 0, count - 1 do
        local e = t:add(f.owner_entry, payload(i * 24, 16))
        e:add(f.owner_pages, payload(i * 24 + 16, 4))
        e:add(f.owner_silent, payload(i * 24 + 20, 4))
    end
    return true
end

-- Requests whose payload is page bytes of the range.
local request_data = { [0x11] = true, [0x30] = true, [0x31] = true, [0x41] = true,
    [0x81] = true, [0xa2] = true }
-- Replies that carry page bytes.
local reply_data = { [0x20] = true, [0x21] = true, [0x40] = true, [0x80] = true,
    [0xa0] = true, [0xa1] = true }

local function dissect_payload(tree, payload, op, reply, h)
    local len = payload:len()
    if op == 0xb0 then
        if len > 0 then
            tree:add(f.stream, payload)
        end
        return true
    end
    if not reply then
        if op == 0x20 and bit.band(h.flags, 0x10) ~= 0 then
            -- An INLINE READ (§6.1): padded with `length` bytes the reply is written over.
            if len > 0 then
                tree:add(f.padding, payload)
            end
            return len == h.length
        elseif request_data[op] then
            add_data(tree, payload, h.offset, h.length)
            return len == h.length
        elseif op == 0x21 or op == 0x51 then
            return handles(tree, payload, h.count)
        elseif op == 0x32 then
            return write_entries(tree, payload, h.count)
        end
        return len == 0
    end
    if h.status ~= 0 then
        -- An error reply has no payload, but for UNREACHABLE (the request bounced back).
        if h.status == 17 then
            if len > 0 then
                tree:add(f.data, payload):set_text("The bounced request's payload")
            end
            return true
        end
        return len == 0
    end
    if reply_data[op] then
        add_data(tree, payload, h.offset, len)
        return true
    elseif op == 0x10 or op == 0x11 or op == 0x12 then
        return handles(tree, payload, h.count)
    elseif op == 0x32 or op == 0x51 then
        return items(tree, payload, h.count, 2, f.item_status, "Item statuses")
    elseif op == 0x02 then
        return stat_record(tree, payload)
    elseif op == 0x82 then
        return owners(tree, payload, h.count)
    elseif op == 0x90 then
        if len ~= 16 then
            return false
        end
        tree:add(f.freed_page, payload)
        return true
    end
    return len == 0
end

-- Links requests and replies; returns the frame's entry in `info`.
local function match(pinfo, client, port, rid, reply, op)
    if not pinfo.visited then
        local key = string.format("%s|%d|%s", client, port, rid)
        local e = {}
        if reply then
            local list = requests[key]
            if list then
                -- The latest transmission before this reply.
                for i = #list, 1, -1 do
                    if list[i].frame < pinfo.number then
                        e.request = list[i].frame
                        e.time = pinfo.abs_ts - list[i].ts
                        local first = info[list[i].frame]
                        if first and not first.response then
                            first.response = pinfo.number
                        end
                        break
                    end
                end
            end
        elseif op ~= 0x31 then
            local list = requests[key] or {}
            list[#list + 1] = { frame = pinfo.number, ts = pinfo.abs_ts }
            requests[key] = list
        end
        info[pinfo.number] = e
    end
    return info[pinfo.number] or {}
end

function bb.dissector(tvb, pinfo, tree)
    local total = tvb:len()
    if total == 0 then
        return 0
    end
    pinfo.cols.protocol = "BlueBridge"
    local root = tree:add(bb, tvb(), "BlueBridge")
    if total < HEADER_LEN then
        root:add_proto_expert_info(ef.short)
        pinfo.cols.info = "BlueBridge (truncated)"
        return total
    end
    local h = {
        version = tvb(0, 1):uint(),
        flags = tvb(1, 1):uint(),
        status = tvb(2, 2):uint(),
        item = tvb(4, 2):uint(),
        count = tvb(6, 2):uint(),
        offset = tvb(16, 2):uint(),
        length = tvb(18, 2):uint(),
    }
    local reply = bit.band(h.flags, 0x01) ~= 0
    -- The page/host address: the destination of a request, the source of a reply (§1).
    local src, dst = ip6_src(), ip6_dst()
    local op
    if src and dst then
        local a = reply and src or dst
        op = a.range(14, 1):uint()
        add_address(root, a.range, reply and "Source" or "Destination")
    end
    local opname = op and (opcodes[op] or string.format("opcode 0x%02x", op)) or "?"
    if op and not opcodes[op] then
        root:add_proto_expert_info(ef.unknown_op)
    end

    root:add(f.version, tvb(0, 1))
    if h.version ~= 1 then
        root:add_proto_expert_info(ef.version)
    end
    local ft = root:add(f.flags, tvb(1, 1))
    ft:add(f.flag_reply, tvb(1, 1))
    ft:add(f.flag_shared, tvb(1, 1))
    ft:add(f.flag_more, tvb(1, 1))
    ft:add(f.flag_retry, tvb(1, 1))
    ft:add(f.flag_inline, tvb(1, 1))
    local st = root:add(f.status, tvb(2, 2))
    if reply and h.status ~= 0 then
        st:add_proto_expert_info(ef.error_status, "Error status: " ..
            (statuses[h.status] or tostring(h.status)))
    end
    root:add(f.item, tvb(4, 2))
    root:add(f.count, tvb(6, 2))
    root:add(f.request_id, tvb(8, 8))
    root:add(f.offset, tvb(16, 2))
    root:add(f.length, tvb(18, 2))
    root:add(f.seg_max, tvb(20, 2))
    root:add(f.reserved, tvb(22, 2))
    root:add(f.lease, tvb(24, 8))
    root:add(f.operand0, tvb(32, 8))
    root:add(f.operand1, tvb(40, 8))
    -- Replies that name an owner in operand0/1: MIGRATE_OUT (and MIGRATE_IN requests).
    if (reply and op == 0x80 and h.status == 0) or (not reply and op == 0x81) then
        root:add(f.owner, tvb(32, 16))
    end

    local payload = total > HEADER_LEN and tvb(HEADER_LEN) or tvb(0, 0)
    if op and not dissect_payload(root, payload, op, reply, h) then
        root:add_proto_expert_info(ef.bad_payload)
    end

    -- Matching: the client's address and port are the request's source, the reply's
    -- destination; notices (request id 0) answer nothing.
    local rid = tvb(8, 8):uint64()
    local notice = reply and op ~= nil and notices[op] == true and rid:tonumber() == 0
    local status_name = statuses[h.status] or tostring(h.status)
    local summary
    if notice then
        root:add(f.notice, true):set_generated()
        summary = string.format("%s notice", opname)
    elseif src and dst and op ~= 0xb0 then
        local client = reply and tostring(dst()) or tostring(src())
        local port = reply and udp_dstport()() or udp_srcport()()
        local m = match(pinfo, client, port, tostring(rid), reply, op)
        if reply then
            if m.request then
                root:add(f.request_in, m.request):set_generated()
                root:add(f.time, NSTime.new(math.floor(m.time),
                    math.floor((m.time % 1) * 1e9))):set_generated()
            else
                root:add_proto_expert_info(ef.no_request)
            end
        else
            if m.response then
                root:add(f.response_in, m.response):set_generated()
            end
            -- The client marks its retransmissions (RETRY); the same frame captured on two
            -- interfaces is not one.
            if bit.band(h.flags, 0x08) ~= 0 then
                root:add(f.retransmission, true):set_generated()
                root:add_proto_expert_info(ef.retransmission)
            end
        end
    end
    if not notice then
        local what
        if op == 0xb0 then
            what = reply and "REPLICATE ack" or "REPLICATE stream"
        elseif reply then
            what = string.format("%s reply %s", opname, status_name)
        else
            what = string.format("%s request", opname)
        end
        local detail = ""
        if h.length > 0 then
            detail = string.format(" off %d len %d", h.offset, h.length)
        end
        summary = string.format("%s id %s%s", what, hex64(rid), detail)
    end
    pinfo.cols.info = summary
    root:set_text("BlueBridge, " .. summary)
    return total
end

local registered_port = nil

local function register_port()
    local t = DissectorTable.get("udp.port")
    if registered_port then
        t:remove(registered_port, bb)
    end
    t:add(bb.prefs.port, bb)
    registered_port = bb.prefs.port
end

function bb.prefs_changed()
    register_port()
end

register_port()
