//! Every byte string a client can send to the NBD gateway's parsers: option headers,
//! INFO/GO and META_CONTEXT payloads, request headers and their validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    store_gateway::proto::fuzz_one(data);
});
