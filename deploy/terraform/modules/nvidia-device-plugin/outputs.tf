output "release_name" {
  description = "Name of the Helm release."
  value       = helm_release.this.name
}

output "namespace" {
  description = "Namespace the device plugin runs in."
  value       = helm_release.this.namespace
}

output "chart_version" {
  description = "Chart version installed."
  value       = helm_release.this.version
}
