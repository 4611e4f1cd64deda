//! The module artifact of the example modules.
daemons::module_main!(
    rama_examples::WordCountModule,
    rama_examples::BankTransferModule,
    rama_examples::TimelineModule,
    rama_examples::KvModule
);
