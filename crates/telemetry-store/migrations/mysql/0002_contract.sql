-- The payload contract (issue 3): which contract version accepted each row, the fields it kept
-- that are not metrics, and what normalization did or noticed.
ALTER TABLE telemetry
    -- The contract's `version`; 0 for rows written before contracts.
    ADD COLUMN schema_version INT UNSIGNED NOT NULL DEFAULT 0 AFTER metrics,
    -- Undeclared, non-numeric fields, e.g. {"firmware": "1.4.2"}; NULL when there are none.
    ADD COLUMN attributes JSON NULL AFTER schema_version,
    -- e.g. {"late": true, "coerced_fields": ["humidity"], "sequence": {"status": "gap", ...}};
    -- NULL when there is nothing to report.
    ADD COLUMN quality JSON NULL AFTER attributes;
