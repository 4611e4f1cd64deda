//! Fuzzes the Conductor's admin request decoder (`net::admin::AdminRequest`):
//! arbitrary frame payloads must decode or be refused with a message, never
//! panic; a request that decodes must survive an encode/decode round trip.
//!
//! Run: `fuzz/smoke.sh 30 admin_request`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use net::admin::AdminRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = AdminRequest::decode(data) {
        assert_eq!(AdminRequest::decode(&request.encode()).as_ref(), Ok(&request));
    }
});
