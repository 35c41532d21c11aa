-- The registry server owns these tables; the backfill never migrates its target.
-- This file recreates them for tests and local rehearsal only, with the columns and constraints
-- the tool depends on and enough of the rest (a foreign key, an updated_at trigger) to behave
-- like production under writes.

CREATE TABLE organizations (
    workos_organization_id text PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE member_profiles (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    workos_organization_id text NOT NULL UNIQUE
        REFERENCES organizations (workos_organization_id) ON DELETE CASCADE,
    display_name varchar(255) NOT NULL,
    slug varchar(255) NOT NULL UNIQUE,
    tagline text,
    description text,
    primary_brand_domain text,
    contact_email varchar(255),
    contact_website text,
    offerings text[] NOT NULL DEFAULT '{}',
    agents jsonb DEFAULT '[]'::jsonb,
    headquarters varchar(255),
    markets text[] NOT NULL DEFAULT '{}',
    tags text[] NOT NULL DEFAULT '{}',
    is_public boolean NOT NULL DEFAULT false,
    show_in_carousel boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION member_profiles_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at = now();
    RETURN NEW;
END;
$$;

CREATE TRIGGER member_profiles_updated_at
    BEFORE UPDATE ON member_profiles
    FOR EACH ROW EXECUTE FUNCTION member_profiles_touch_updated_at();

CREATE TABLE agent_capabilities_snapshot (
    agent_url text PRIMARY KEY,
    protocol text NOT NULL,
    inferred_type text,
    discovery_error text,
    oauth_required boolean DEFAULT false,
    tools_count integer NOT NULL DEFAULT 0,
    standard_operations jsonb,
    last_discovered timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE type_reclassification_log (
    id bigserial PRIMARY KEY,
    agent_url text NOT NULL,
    member_id text,
    old_type text,
    new_type text NOT NULL,
    source text NOT NULL
        CHECK (source IN ('backfill_script', 'crawler_promote', 'member_write')),
    run_id text,
    changed_at timestamptz NOT NULL DEFAULT now(),
    notes jsonb
);
