//! The KMIP tags and enumeration values this server reads or writes
//! (KMIP 1.0–2.1; the values PyKMIP and the OASIS specifications use).

#![allow(missing_docs)] // the names are the specification's

pub const ACTIVATION_DATE: u32 = 0x420001;
pub const APPLICATION_SPECIFIC_INFORMATION: u32 = 0x420004;
pub const ATTRIBUTE: u32 = 0x420008;
pub const ATTRIBUTE_INDEX: u32 = 0x420009;
pub const ATTRIBUTE_NAME: u32 = 0x42000A;
pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
pub const AUTHENTICATION: u32 = 0x42000C;
pub const BATCH_COUNT: u32 = 0x42000D;
pub const BATCH_ERROR_CONTINUATION_OPTION: u32 = 0x42000E;
pub const BATCH_ITEM: u32 = 0x42000F;
pub const BATCH_ORDER_OPTION: u32 = 0x420010;
pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
pub const COMMON_TEMPLATE_ATTRIBUTE: u32 = 0x42001F;
pub const COMPROMISE_OCCURRENCE_DATE: u32 = 0x420021;
pub const CREDENTIAL: u32 = 0x420023;
pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
pub const CRYPTOGRAPHIC_LENGTH: u32 = 0x42002A;
pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
pub const CRYPTOGRAPHIC_USAGE_MASK: u32 = 0x42002C;
pub const DEACTIVATION_DATE: u32 = 0x42002F;
pub const DESTROY_DATE: u32 = 0x420033;
pub const INITIAL_DATE: u32 = 0x420039;
pub const IV_COUNTER_NONCE: u32 = 0x42003D;
pub const KEY_BLOCK: u32 = 0x420040;
pub const KEY_COMPRESSION_TYPE: u32 = 0x420041;
pub const KEY_FORMAT_TYPE: u32 = 0x420042;
pub const KEY_MATERIAL: u32 = 0x420043;
pub const KEY_VALUE: u32 = 0x420045;
pub const KEY_WRAPPING_DATA: u32 = 0x420046;
pub const KEY_WRAPPING_SPECIFICATION: u32 = 0x420047;
pub const LAST_CHANGE_DATE: u32 = 0x420048;
pub const MAXIMUM_ITEMS: u32 = 0x42004F;
pub const MAXIMUM_RESPONSE_SIZE: u32 = 0x420050;
pub const NAME: u32 = 0x420053;
pub const NAME_TYPE: u32 = 0x420054;
pub const NAME_VALUE: u32 = 0x420055;
pub const OBJECT_GROUP: u32 = 0x420056;
pub const OBJECT_TYPE: u32 = 0x420057;
pub const OFFSET: u32 = 0x420058;
pub const OPERATION: u32 = 0x42005C;
pub const OPERATION_POLICY_NAME: u32 = 0x42005D;
pub const PADDING_METHOD: u32 = 0x42005F;
pub const PRIVATE_KEY_TEMPLATE_ATTRIBUTE: u32 = 0x420065;
pub const PROTOCOL_VERSION: u32 = 0x420069;
pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
pub const PUBLIC_KEY_TEMPLATE_ATTRIBUTE: u32 = 0x42006E;
pub const QUERY_FUNCTION: u32 = 0x420074;
pub const REQUEST_HEADER: u32 = 0x420077;
pub const REQUEST_MESSAGE: u32 = 0x420078;
pub const REQUEST_PAYLOAD: u32 = 0x420079;
pub const RESPONSE_HEADER: u32 = 0x42007A;
pub const RESPONSE_MESSAGE: u32 = 0x42007B;
pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
pub const RESULT_MESSAGE: u32 = 0x42007D;
pub const RESULT_REASON: u32 = 0x42007E;
pub const RESULT_STATUS: u32 = 0x42007F;
pub const REVOCATION_MESSAGE: u32 = 0x420080;
pub const REVOCATION_REASON: u32 = 0x420081;
pub const REVOCATION_REASON_CODE: u32 = 0x420082;
pub const SECRET_DATA: u32 = 0x420085;
pub const SECRET_DATA_TYPE: u32 = 0x420086;
pub const SERVER_INFORMATION: u32 = 0x420088;
pub const STATE: u32 = 0x42008D;
pub const SYMMETRIC_KEY: u32 = 0x42008F;
pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
pub const TIME_STAMP: u32 = 0x420092;
pub const UNIQUE_BATCH_ITEM_ID: u32 = 0x420093;
pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
pub const VENDOR_IDENTIFICATION: u32 = 0x42009D;
pub const DATA: u32 = 0x4200C2;
pub const RANDOM_IV: u32 = 0x4200C5;
pub const IV_LENGTH: u32 = 0x4200CD;
pub const TAG_LENGTH: u32 = 0x4200CE;
pub const ORIGINAL_CREATION_DATE: u32 = 0x4200BC;
pub const DESCRIPTION: u32 = 0x4200FC;
pub const COMMENT: u32 = 0x4200FD;
pub const AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA: u32 = 0x4200FE;
pub const AUTHENTICATED_ENCRYPTION_TAG: u32 = 0x4200FF;
pub const SENSITIVE: u32 = 0x420120;
pub const ALWAYS_SENSITIVE: u32 = 0x420121;
pub const EXTRACTABLE: u32 = 0x420122;
pub const NEVER_EXTRACTABLE: u32 = 0x420123;
pub const ATTRIBUTES: u32 = 0x420125;
pub const COMMON_ATTRIBUTES: u32 = 0x420126;
pub const PRIVATE_KEY_ATTRIBUTES: u32 = 0x420127;
pub const PUBLIC_KEY_ATTRIBUTES: u32 = 0x420128;
pub const ATTRIBUTE_REFERENCE: u32 = 0x42013B;
pub const CURRENT_ATTRIBUTE: u32 = 0x42013C;
pub const NEW_ATTRIBUTE: u32 = 0x42013D;
pub const OFFSET_ITEMS: u32 = 0x4200D4;
pub const LOCATED_ITEMS: u32 = 0x4200D5;
pub const KEY: u32 = 0x42003F;
pub const LINK: u32 = 0x42004A;
pub const LINK_TYPE: u32 = 0x42004B;
pub const LINKED_OBJECT_IDENTIFIER: u32 = 0x42004C;
pub const PRIVATE_KEY_UNIQUE_IDENTIFIER: u32 = 0x420066;
pub const PUBLIC_KEY_UNIQUE_IDENTIFIER: u32 = 0x42006F;
pub const PRIVATE_KEY: u32 = 0x420064;
pub const PUBLIC_KEY: u32 = 0x42006D;
pub const ENCRYPTION_KEY_INFORMATION: u32 = 0x420036;

/// Operation codes.
pub mod op {
    pub const CREATE: u32 = 0x01;
    pub const CREATE_KEY_PAIR: u32 = 0x02;
    pub const REGISTER: u32 = 0x03;
    pub const REKEY: u32 = 0x04;
    pub const LOCATE: u32 = 0x08;
    pub const CHECK: u32 = 0x09;
    pub const GET: u32 = 0x0A;
    pub const GET_ATTRIBUTES: u32 = 0x0B;
    pub const GET_ATTRIBUTE_LIST: u32 = 0x0C;
    pub const ADD_ATTRIBUTE: u32 = 0x0D;
    pub const MODIFY_ATTRIBUTE: u32 = 0x0E;
    pub const DELETE_ATTRIBUTE: u32 = 0x0F;
    pub const ACTIVATE: u32 = 0x12;
    pub const REVOKE: u32 = 0x13;
    pub const DESTROY: u32 = 0x14;
    pub const QUERY: u32 = 0x18;
    pub const DISCOVER_VERSIONS: u32 = 0x1E;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;
    pub const SET_ATTRIBUTE: u32 = 0x31;

    /// The operation's name as the specification writes it (audit records).
    pub fn name(code: u32) -> &'static str {
        match code {
            CREATE => "Create",
            CREATE_KEY_PAIR => "Create Key Pair",
            REGISTER => "Register",
            REKEY => "ReKey",
            LOCATE => "Locate",
            CHECK => "Check",
            GET => "Get",
            GET_ATTRIBUTES => "Get Attributes",
            GET_ATTRIBUTE_LIST => "Get Attribute List",
            ADD_ATTRIBUTE => "Add Attribute",
            MODIFY_ATTRIBUTE => "Modify Attribute",
            DELETE_ATTRIBUTE => "Delete Attribute",
            ACTIVATE => "Activate",
            REVOKE => "Revoke",
            DESTROY => "Destroy",
            QUERY => "Query",
            DISCOVER_VERSIONS => "Discover Versions",
            ENCRYPT => "Encrypt",
            DECRYPT => "Decrypt",
            SET_ATTRIBUTE => "Set Attribute",
            _ => "unsupported operation",
        }
    }
}

/// Object Type values.
pub mod object_type {
    pub const SYMMETRIC_KEY: u32 = 0x02;
    pub const PUBLIC_KEY: u32 = 0x03;
    pub const PRIVATE_KEY: u32 = 0x04;
    pub const SECRET_DATA: u32 = 0x07;
}

/// Result Status values.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const OPERATION_FAILED: u32 = 1;
}

/// Result Reason values.
pub mod reason {
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    pub const RESPONSE_TOO_LARGE: u32 = 0x02;
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    pub const INVALID_MESSAGE: u32 = 0x04;
    pub const OPERATION_NOT_SUPPORTED: u32 = 0x05;
    pub const MISSING_DATA: u32 = 0x06;
    pub const INVALID_FIELD: u32 = 0x07;
    pub const FEATURE_NOT_SUPPORTED: u32 = 0x08;
    pub const CRYPTOGRAPHIC_FAILURE: u32 = 0x0A;
    pub const ILLEGAL_OPERATION: u32 = 0x0B;
    pub const PERMISSION_DENIED: u32 = 0x0C;
    pub const KEY_FORMAT_TYPE_NOT_SUPPORTED: u32 = 0x10;
    pub const NOT_EXTRACTABLE: u32 = 0x17;
    pub const OBJECT_ALREADY_EXISTS: u32 = 0x18;
    pub const GENERAL_FAILURE: u32 = 0x100;
}

/// State values.
pub mod state {
    pub const PRE_ACTIVE: u32 = 1;
    pub const ACTIVE: u32 = 2;
    pub const DEACTIVATED: u32 = 3;
    pub const COMPROMISED: u32 = 4;
    pub const DESTROYED: u32 = 5;
}

/// Cryptographic Algorithm values.
pub mod alg {
    pub const AES: u32 = 0x03;
    pub const RSA: u32 = 0x04;
}

/// Block Cipher Mode values.
pub mod mode {
    pub const CBC: u32 = 0x01;
    pub const GCM: u32 = 0x09;
}

/// Padding Method values.
pub mod padding {
    pub const NONE: u32 = 0x01;
    pub const PKCS5: u32 = 0x03;
}

/// Key Format Type values.
pub mod format {
    pub const RAW: u32 = 0x01;
    pub const OPAQUE: u32 = 0x02;
    pub const PKCS_1: u32 = 0x03;
    pub const PKCS_8: u32 = 0x04;
    pub const X_509: u32 = 0x05;
    pub const TRANSPARENT_SYMMETRIC_KEY: u32 = 0x07;
}

/// Query Function values.
pub mod query {
    pub const OPERATIONS: u32 = 0x01;
    pub const OBJECTS: u32 = 0x02;
    pub const SERVER_INFORMATION: u32 = 0x03;
}

/// Name Type values.
pub mod name_type {
    pub const UNINTERPRETED_TEXT_STRING: u32 = 0x01;
}

/// Revocation Reason Code values.
pub mod revocation {
    pub const UNSPECIFIED: u32 = 0x01;
    pub const KEY_COMPROMISE: u32 = 0x02;
    pub const CA_COMPROMISE: u32 = 0x03;
    pub const AFFILIATION_CHANGED: u32 = 0x04;
    pub const SUPERSEDED: u32 = 0x05;
    pub const CESSATION_OF_OPERATION: u32 = 0x06;
    pub const PRIVILEGE_WITHDRAWN: u32 = 0x07;
}

/// Batch Error Continuation Option values.
pub mod continuation {
    pub const CONTINUE: u32 = 1;
    pub const STOP: u32 = 2;
    pub const UNDO: u32 = 3;
}

/// Cryptographic Usage Mask bits.
pub mod usage {
    pub const SIGN: i32 = 0x01;
    pub const VERIFY: i32 = 0x02;
    pub const ENCRYPT: i32 = 0x04;
    pub const DECRYPT: i32 = 0x08;
    pub const EXPORT: i32 = 0x40;
}

/// A tag's name for messages ("Unique Identifier"), or its hex value.
pub fn name(tag: u32) -> String {
    let known = match tag {
        ACTIVATION_DATE => "Activation Date",
        ATTRIBUTE => "Attribute",
        ATTRIBUTE_NAME => "Attribute Name",
        ATTRIBUTE_VALUE => "Attribute Value",
        ATTRIBUTES => "Attributes",
        AUTHENTICATION => "Authentication",
        BATCH_COUNT => "Batch Count",
        BATCH_ITEM => "Batch Item",
        BATCH_ERROR_CONTINUATION_OPTION => "Batch Error Continuation Option",
        BLOCK_CIPHER_MODE => "Block Cipher Mode",
        CRYPTOGRAPHIC_ALGORITHM => "Cryptographic Algorithm",
        CRYPTOGRAPHIC_LENGTH => "Cryptographic Length",
        CRYPTOGRAPHIC_PARAMETERS => "Cryptographic Parameters",
        CRYPTOGRAPHIC_USAGE_MASK => "Cryptographic Usage Mask",
        DATA => "Data",
        IV_COUNTER_NONCE => "IV/Counter/Nonce",
        KEY_BLOCK => "Key Block",
        KEY_FORMAT_TYPE => "Key Format Type",
        KEY_MATERIAL => "Key Material",
        KEY_VALUE => "Key Value",
        KEY_WRAPPING_SPECIFICATION => "Key Wrapping Specification",
        MAXIMUM_ITEMS => "Maximum Items",
        MAXIMUM_RESPONSE_SIZE => "Maximum Response Size",
        NAME => "Name",
        NAME_VALUE => "Name Value",
        NAME_TYPE => "Name Type",
        OBJECT_TYPE => "Object Type",
        OPERATION => "Operation",
        PADDING_METHOD => "Padding Method",
        PROTOCOL_VERSION => "Protocol Version",
        PROTOCOL_VERSION_MAJOR => "Protocol Version Major",
        PROTOCOL_VERSION_MINOR => "Protocol Version Minor",
        QUERY_FUNCTION => "Query Function",
        REQUEST_HEADER => "Request Header",
        REQUEST_MESSAGE => "Request Message",
        REQUEST_PAYLOAD => "Request Payload",
        RESPONSE_MESSAGE => "Response Message",
        REVOCATION_REASON => "Revocation Reason",
        REVOCATION_REASON_CODE => "Revocation Reason Code",
        SECRET_DATA => "Secret Data",
        SECRET_DATA_TYPE => "Secret Data Type",
        STATE => "State",
        SYMMETRIC_KEY => "Symmetric Key",
        TAG_LENGTH => "Tag Length",
        TEMPLATE_ATTRIBUTE => "Template-Attribute",
        UNIQUE_BATCH_ITEM_ID => "Unique Batch Item ID",
        UNIQUE_IDENTIFIER => "Unique Identifier",
        AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA => "Authenticated Encryption Additional Data",
        AUTHENTICATED_ENCRYPTION_TAG => "Authenticated Encryption Tag",
        _ => return format!("tag {tag:06X}"),
    };
    known.to_owned()
}

/// The highest tag KMIP 2.1 defines; above it a tag is unknown.
pub const LAST_DEFINED: u32 = 0x420165;
